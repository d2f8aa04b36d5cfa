"""Routes declared once, served by the fast path and by FastAPI (serve_app/http/routes.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from serve_app.http.ingress import ModelServer, fastapi_app
from serve_app.lifecycle import RequestRefused
from serve_app.http.responses import error_response, json_response
from serve_app.http.routes import FastPath, build_api, declared_routes, route


class Server:
    def __init__(self):
        self.calls = []

    @route("POST", "/m/{name}/infer", "/m/{name}/versions/{version}/infer", fast=True)
    async def infer(self, name: str, request: Request, version: str | None = None) -> Response:
        body = await request.body()
        self.calls.append((name, version, body))
        return json_response({"name": name, "version": version, "bytes": len(body)})

    @route("POST", "/m/{name}:predict", fast=True)
    async def predict(self, name: str, request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer ok":
            raise RequestRefused(error_response(401, "no token"))
        if name == "broken":
            raise RuntimeError("a bug outside the lifecycle")
        return json_response({"predicted": name})

    @route(("GET", "POST"), "/m/{name}")
    async def describe(self, name: str) -> Response:
        return json_response({"described": name})


class Counting:
    """An ASGI app in front of FastAPI that counts the requests reaching it."""

    def __init__(self, app):
        self.app, self.requests = app, 0

    def add_exception_handler(self, exc_class, handler):
        self.app.add_exception_handler(exc_class, handler)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


def call(app, method: str, path: str, root_path: str = "", **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, root_path + path, **kwargs)
    return asyncio.run(go())


@pytest.fixture
def served():
    server = Server()
    fallback = Counting(build_api(server))
    return server, fallback, FastPath(server, fallback)


def test_fast_routes_are_answered_without_fastapi(served):
    server, fallback, app = served
    response = call(app, "POST", "/m/iris/infer", content=b"12345")
    assert response.json() == {"name": "iris", "version": None, "bytes": 5}
    response = call(app, "POST", "/m/iris/versions/2/infer", content=b"")
    assert response.json() == {"name": "iris", "version": "2", "bytes": 0}
    # a name with a colon: the last ":predict" ends it, as Starlette's own matching does
    assert call(app, "POST", "/m/a:b:predict", headers={"authorization": "Bearer ok"}).json() == {"predicted": "a:b"}
    assert fallback.requests == 0
    assert server.calls == [("iris", None, b"12345"), ("iris", "2", b"")]


def test_every_other_request_goes_to_fastapi(served):
    _, fallback, app = served
    assert call(app, "GET", "/m/iris").json() == {"described": "iris"}
    assert call(app, "POST", "/m/iris").json() == {"described": "iris"}
    assert call(app, "GET", "/m/iris/infer").status_code == 405  # the fast route's path, not its method
    assert call(app, "POST", "/nowhere").status_code == 404
    assert call(app, "GET", "/openapi.json").json()["paths"].keys() == {
        "/m/{name}/infer", "/m/{name}/versions/{version}/infer", "/m/{name}:predict", "/m/{name}"}
    assert fallback.requests == 5


def test_refusals_and_bugs_on_the_fast_path_become_json_errors(served):
    _, _, app = served
    refused = call(app, "POST", "/m/iris:predict")
    assert (refused.status_code, refused.json()) == (401, {"error": "no token"})
    broken = call(app, "POST", "/m/broken:predict", headers={"authorization": "Bearer ok"})
    assert broken.status_code == 500 and broken.json() == {"error": "internal error; see server logs"}


def test_the_route_prefix_is_not_part_of_the_matched_path(served):
    server, fallback, app = served
    response = call(app, "POST", "/m/iris/infer", root_path="/prefix", content=b"x")
    assert response.json()["name"] == "iris" and fallback.requests == 0


def test_only_plain_parameters_can_be_fast():
    class Typed:
        @route("POST", "/x/{n:int}", fast=True)
        async def typed(self, n: int, request: Request) -> Response:
            return json_response(n)

    with pytest.raises(ValueError, match="plain"):
        FastPath(Typed(), build_api(Typed()))


def test_the_ingress_declares_its_inference_routes_fast_and_fastapi_documents_every_route():
    server = object.__new__(ModelServer.func_or_class)  # routes only: nothing is started
    routes = declared_routes(server)
    fast = sorted(path for spec, _ in routes if spec.fast for path in spec.paths)
    assert fast == ["/invocations", "/v1/models/{name}/invocations", "/v1/models/{name}/versions/{version}/invocations",
                    "/v1/models/{name}/versions/{version}:predict", "/v1/models/{name}:predict",
                    "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"]
    paths = fastapi_app(server).openapi()["paths"]
    assert {path for spec, _ in routes for path in spec.paths} == set(paths)
    assert set(paths["/v2/repository/index"]) == {"get", "post"}
    assert "requestBody" in paths["/v2/models/{name}/infer"]["post"]  # the documented V2 body
    assert "self" not in str(paths)
