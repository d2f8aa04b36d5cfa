"""``/docs`` works without internet access and runs a working example request per model.

In-process: the examples built from a model's stored metadata (V1 records, V2 per-column
tensors with BYTES for strings), the page and its assets below a route prefix, through the
fast path. Live: Debian's chromium, driven by playwright, opens ``/docs`` of the test server
with every non-local request blocked, checks that the operations render, picks a model's
example, executes it and reads the prediction in the page; once on the open application, once
below the guarded application's route prefix with its bearer token entered in "Authorize".
Screenshots go to tests/artifacts/ (gitignored; CI keeps them as artifacts).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from conftest import GUARDED, ROOT, require_tool
from serve_app.http.openapi_docs import (ASSETS, ASSETS_PATH, V1_REQUEST, V2_REQUEST, v1_example, v2_example,
                                         with_examples)
from serve_app.http.responses import json_response
from serve_app.http.routes import FastPath, build_api, route
from serve_app.metadata import Feature, ModelMetadata

ARTIFACTS = ROOT / "tests" / "artifacts"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
V1_PREDICT = "/v1/models/{name}:predict"
V2_INFER = "/v2/models/{name}/infer"


def metadata(name: str, features: list[Feature], example: list[dict] | None = None,
             reference_stats: dict | None = None) -> ModelMetadata:
    return ModelMetadata(name=name, version="2", framework="sklearn", task="classification", features=features,
                         artifact="model.skops", sha256="0" * 64, classes=["leave", "stay"],
                         example=example or [], reference_stats=reference_stats or {})


CHURN = metadata("churn", [
    Feature("plan", "category", categories=["basic", "pro"]),
    Feature("city", "string", nullable=True),
    Feature("tenure_months", "int64"),
    Feature("monthly_fee", "float64", nullable=True),
    Feature("autopay", "bool"),
], example=[
    {"plan": "pro", "city": None, "tenure_months": 3.0, "monthly_fee": 20, "autopay": False},  # a missing city
    {"plan": "basic", "city": "Lyon", "tenure_months": 12, "monthly_fee": 9.5, "autopay": True},
    {"plan": "pro", "city": "Oslo", "tenure_months": 30, "monthly_fee": None, "autopay": False},
    {"plan": "basic", "city": "Rome", "tenure_months": 1, "monthly_fee": 12.25, "autopay": True},
])


# -- in-process ---------------------------------------------------------------------------------
def test_examples_of_a_mixed_type_model_are_typed_per_column():
    """Complete rows first (at most three), V1 as records, V2 one tensor per column with its
    datatype: strings and categories BYTES, integers INT64 (3.0 becomes 3), floats FP64."""
    assert v1_example(CHURN) == {"instances": [
        {"plan": "basic", "city": "Lyon", "tenure_months": 12, "monthly_fee": 9.5, "autopay": True},
        {"plan": "basic", "city": "Rome", "tenure_months": 1, "monthly_fee": 12.25, "autopay": True},
        {"plan": "pro", "city": None, "tenure_months": 3.0, "monthly_fee": 20, "autopay": False},
    ]}
    assert v2_example(CHURN) == {"inputs": [
        {"name": "plan", "shape": [3], "datatype": "BYTES", "data": ["basic", "basic", "pro"]},
        {"name": "city", "shape": [3], "datatype": "BYTES", "data": ["Lyon", "Rome", None]},
        {"name": "tenure_months", "shape": [3], "datatype": "INT64", "data": [12, 1, 3]},
        {"name": "monthly_fee", "shape": [3], "datatype": "FP64", "data": [9.5, 12.25, 20.0]},
        {"name": "autopay", "shape": [3], "datatype": "BOOL", "data": [True, True, False]},
    ]}


def test_a_model_stored_without_an_example_gets_one_row_of_training_means():
    old = metadata("old", [Feature("a"), Feature("n", "int64"), Feature("flag", "bool"),
                           Feature("c", "category", categories=["x", "y"])],
                   reference_stats={"a": {"mean": 5.843333333}, "n": {"mean": 2.6}, "flag": {"mean": 0.7},
                                    "c": {"mode": "y"}})
    assert v1_example(old) == {"instances": [{"a": 5.84333, "n": 3, "flag": True, "c": "y"}]}
    assert [t["datatype"] for t in v2_example(old)["inputs"]] == ["FP64", "INT64", "BOOL", "BYTES"]


class Server:
    """An ingress with one V1 and one V2 route documented as ours, and a registry of models."""

    def __init__(self, models: dict[str, ModelMetadata]):
        self.models, self.asked = models, 0

    @route("POST", "/v1/models/{name}:predict", fast=True, openapi_extra=V1_REQUEST)
    async def predict(self, name: str, request: Request) -> Response:
        return json_response({"predictions": [name]})

    @route("POST", "/v2/models/{name}/versions/{version}/infer", openapi_extra=V2_REQUEST)
    async def infer(self, name: str, version: str, request: Request) -> Response:
        return json_response({"model_name": name, "model_version": version})

    def documented(self) -> dict[str, ModelMetadata]:
        self.asked += 1
        return self.models


class Client:
    """Requests to an ASGI app as Serve makes them below a route prefix: the full path, the
    prefix as ``root_path``."""

    def __init__(self, app, prefix: str):
        self.app, self.prefix = app, prefix

    def request(self, method: str, path: str) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, root_path=self.prefix)
            async with httpx.AsyncClient(transport=transport, base_url=f"http://test{self.prefix}") as client:
                return await client.request(method, path.lstrip("/"))
        return asyncio.run(send())

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def post(self, path: str) -> httpx.Response:
        return self.request("POST", path)


def test_the_page_and_its_assets_are_served_below_the_route_prefix_through_the_fast_path():
    server = Server({"churn": CHURN})
    api = build_api(server, documented_models=server.documented, title="t")
    client = Client(FastPath(server, api), "/prefix")
    assert server.asked == 0  # the models are asked for when the schema is, not before

    page = client.get("/docs").text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert f'"/prefix{ASSETS_PATH}/{asset}"' in page
        response = client.get(f"{ASSETS_PATH}/{asset}")
        assert response.status_code == 200 and response.content == (ASSETS / asset).read_bytes()
    assert "url: '/prefix/openapi.json'" in page and "cdn" not in page.lower() and "https://" not in page
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and f"/prefix{ASSETS_PATH}/redoc.standalone.js" in redoc.text
    assert client.post("/v1/models/churn:predict").json() == {"predictions": ["churn"]}  # the fast path still

    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {V1_PREDICT, "/v2/models/{name}/versions/{version}/infer"}  # no asset paths
    assert schema["servers"] == [{"url": "/prefix"}] and "security" not in schema
    v1 = schema["paths"][V1_PREDICT]["post"]
    assert v1["requestBody"]["content"]["application/json"]["examples"]["churn"]["value"] == v1_example(CHURN)
    assert [p["examples"] for p in v1["parameters"] if p["name"] == "name"] == [
        {"churn": {"summary": "churn", "value": "churn"}}]
    v2 = schema["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]
    assert v2["requestBody"]["content"]["application/json"]["examples"]["churn"]["value"] == v2_example(CHURN)
    assert {p["name"]: p["examples"]["churn"]["value"] for p in v2["parameters"]} == {"name": "churn",
                                                                                       "version": "2"}
    assert "x-serve-app" not in json.dumps(schema)

    server.models = {"churn": CHURN, "old": metadata("old", [Feature("a")])}  # a reload added one
    assert set(client.get("/openapi.json").json()["paths"][V1_PREDICT]["post"]["requestBody"]["content"][
        "application/json"]["examples"]) == {"churn", "old"}


def test_a_guarded_api_documents_its_bearer_token():
    schema = with_examples({"paths": {}}, {}, bearer=True)
    assert schema["security"] == [{"bearer": []}]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# -- live, in a real browser ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium")  # Debian's: `make system-tools` installs it; no playwright download
    from playwright.sync_api import sync_playwright  # a test extra: only the browser tests need it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


class DocsPage:
    """One ``/docs`` page in a fresh browser context: every request to a host other than this
    machine is recorded and blocked (the page must work air-gapped), page errors recorded."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)
        self.page.locator(".opblock").first.wait_for(timeout=30_000)

    def _route(self, route) -> None:
        url = route.request.url
        self.requests.append(url)
        if urlparse(url).scheme in ("http", "https") and urlparse(url).hostname not in LOCAL_HOSTS:
            self.foreign.append(url)
            route.abort()
        else:
            route.continue_()

    def operation(self, path: str, method: str = "post"):
        return self.page.locator(f".opblock-{method}").filter(
            has=self.page.locator(f".opblock-summary-path[data-path='{path}']"))

    def run_example(self, path: str, model: str) -> tuple[str, dict, dict]:
        """Try it out with ``model``'s example (its name and its body), Execute: the status
        and body shown in the page, and the body that was sent."""
        op = self.operation(path)
        op.locator(".opblock-summary").click()
        op.locator("button.try-out__btn").click()
        op.locator(".parameters-container select.examples-select-element").select_option(model)
        op.locator(".opblock-section-request-body select.examples-select-element").select_option(model)
        sent = json.loads(op.locator(".opblock-section-request-body textarea").input_value())
        op.locator("button.execute").click()
        row = op.locator(".live-responses-table tbody tr.response").first
        row.wait_for(timeout=60_000)
        status = row.locator(".response-col_status").inner_text().strip()
        shown = json.loads(row.locator(".response-col_description pre").first.inner_text())
        return status, shown, sent

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def docs_page(browser):
    pages: list[DocsPage] = []

    def open_page(url: str) -> DocsPage:
        pages.append(DocsPage(browser, url))
        return pages[-1]

    yield open_page
    for page in pages:
        page.close()


def rendered_operations(docs: DocsPage) -> set[tuple[str, str]]:
    summaries = docs.page.locator(".opblock-summary")
    return {(s.locator(".opblock-summary-method").inner_text().lower(),
             s.locator(".opblock-summary-path").get_attribute("data-path")) for s in summaries.all()}


def documented_operations(spec: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, operations in spec["paths"].items() for method in operations}


def assert_offline(docs: DocsPage, prefix: str = "") -> None:
    assert not docs.foreign, f"requests to other hosts: {docs.foreign}"
    assert not docs.errors, docs.errors
    assets = {urlparse(u).path for u in docs.requests if ASSETS_PATH in u}
    assert {f"{prefix}{ASSETS_PATH}/swagger-ui-bundle.js", f"{prefix}{ASSETS_PATH}/swagger-ui.css"} <= assets


@pytest.mark.serve
def test_docs_page_renders_offline_and_runs_a_models_example(browser, docs_page, serve_cluster, http):
    spec = http.get("/openapi.json").json()
    docs = docs_page(f"{serve_cluster.url}/docs")
    assert rendered_operations(docs) == documented_operations(spec)  # every operation, V1 predict and V2 infer too
    assert {("post", V1_PREDICT), ("post", V2_INFER)} <= rendered_operations(docs)
    declared = [m["name"] for m in serve_cluster.config["applications"][0]["args"]["models"]]
    v1 = spec["paths"][V1_PREDICT]["post"]["requestBody"]["content"]["application/json"]["examples"]
    v2 = spec["paths"][V2_INFER]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert list(v1) == list(v2) == declared
    for name in declared:  # every example works
        for path, examples in ((f"/v1/models/{name}:predict", v1), (f"/v2/models/{name}/infer", v2)):
            response = http.post(path, json=examples[name]["value"])
            assert response.status_code == 200, (path, examples[name]["value"], response.text)

    # churn: the mixed-type demo (string and category columns); not the first example, so it is picked
    status, shown, sent = docs.run_example(V1_PREDICT, "churn")
    assert sent == v1["churn"]["value"] and any(isinstance(v, str) for v in sent["instances"][0].values())
    assert status == "200", shown
    assert shown == http.post("/v1/models/churn:predict", json=sent).json()
    assert len(shown["predictions"]) == len(sent["instances"])
    # churn-xgb over V2: one tensor per column, its strings as BYTES
    status, shown, sent = docs.run_example(V2_INFER, "churn-xgb")
    docs.screenshot("docs-page.png")
    assert sent == v2["churn-xgb"]["value"] and "BYTES" in {t["datatype"] for t in sent["inputs"]}
    assert status == "200", shown
    assert shown["outputs"] == http.post("/v2/models/churn-xgb/infer", json=sent).json()["outputs"]
    assert_offline(docs)


@pytest.mark.serve
def test_docs_page_below_a_route_prefix_with_the_bearer_token(browser, docs_page, serve_cluster, http):
    docs = docs_page(f"{serve_cluster.url}{GUARDED}/docs")
    assert {("post", V1_PREDICT), ("post", V2_INFER)} <= rendered_operations(docs)
    docs.page.locator("button.authorize").first.click()
    dialog = docs.page.locator(".modal-ux")
    dialog.locator("input").fill(serve_cluster.api_token)
    dialog.locator("button.authorize").click()
    dialog.locator("button.btn-done").click()

    status, shown, sent = docs.run_example(V2_INFER, "iris")
    docs.screenshot("docs-page-guarded.png")
    assert status == "200", shown
    assert [t["datatype"] for t in sent["inputs"]] == ["FP64"] * 4  # one tensor per column
    assert shown["model_name"] == "iris" and shown["outputs"][0]["name"] == "predict"
    answer = http.post(f"{GUARDED}/v2/models/iris/infer", json=sent,
                       headers={"Authorization": f"Bearer {serve_cluster.api_token}"})
    assert shown["outputs"] == answer.json()["outputs"]
    assert_offline(docs, GUARDED)


@pytest.mark.serve
def test_redoc_renders_offline(browser, serve_cluster):
    """ReDoc's bundle would show Redocly's logo from their CDN: the page's Content-Security-Policy
    keeps the browser from asking (a request it refuses never reaches the route below)."""
    context = browser.new_context()
    foreign: list[str] = []

    def block(route) -> None:
        if urlparse(route.request.url).hostname not in LOCAL_HOSTS and route.request.url.startswith("http"):
            foreign.append(route.request.url)
            return route.abort()
        return route.continue_()

    try:
        context.route("**/*", block)
        page = context.new_page()
        page.goto(f"{serve_cluster.url}/redoc")
        page.locator("h2", has_text="V1 Predict").first.wait_for(timeout=30_000)  # the operation
        assert not foreign, foreign
    finally:
        context.close()
    assert httpx.get(f"{serve_cluster.url}{ASSETS_PATH}/redoc.standalone.js").status_code == 200
