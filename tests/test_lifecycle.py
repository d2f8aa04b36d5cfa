"""The request lifecycle without Ray or a server: a Starlette request, a real registry with
models loaded in this process, and what every route relies on: auth, the model's timeout,
errors as JSON statuses, the version that answered, the access log."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from starlette.requests import Request

from serve_app.config import AccessLogSpec
from serve_app.errors import BadInput, ModelNotFoundError
from serve_app.http.lifecycle import HttpCall
from serve_app.lifecycle import RequestLifecycle, RequestRefused
from serve_app.store import ModelStore
from serve_app.tools.train import train_model
from test_registry import registry_for

TOKEN = b"s3cret"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    train_model("iris", store, version="1")
    return registry_for(store, [{"name": "iris", "timeout_s": 0.2}])


def lifecycle(registry, token=None, sample_rate=0.0) -> RequestLifecycle:
    return RequestLifecycle(registry, AccessLogSpec(sample_rate=sample_rate), token)


def request(headers: dict | None = None, path: str = "/v2/models/iris/infer") -> HttpCall:
    return HttpCall(Request({"type": "http", "method": "POST", "path": path, "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}))


def run_scope(life: RequestLifecycle, work, model: str = "iris", headers: dict | None = None, **options):
    async def route():
        async with life.scope(request(headers), "v2", model, **options) as scope:
            await work(scope)
        return scope.response
    return asyncio.run(route())


def body(response) -> dict:
    return orjson.loads(response.body)


def test_a_reply_is_sent_with_the_version_that_answered(registry):
    async def work(scope):
        scope.reply({"ok": True}, "7")
    response = run_scope(lifecycle(registry), work)
    assert response.status_code == 200 and body(response) == {"ok": True}
    assert response.headers["x-model-version"] == "7"
    async def metadata(scope):
        scope.reply({"ok": True})  # no version given: the model's default describes it
    assert run_scope(lifecycle(registry), metadata).headers["x-model-version"] == "1"


def test_client_errors_become_their_status_and_reason(registry):
    async def work(scope):
        raise BadInput("rows differ", "wrong_shape")
    response = run_scope(lifecycle(registry), work)
    assert response.status_code == 400 and body(response) == {"error": "rows differ", "reason": "wrong_shape"}
    assert "x-model-version" not in response.headers


def test_an_unknown_model_is_a_404_without_a_version(registry):
    async def work(scope):
        await registry.served("tulip")
    response = run_scope(lifecycle(registry), work, model="tulip")
    assert response.status_code == 404 and body(response)["reason"] == "model_not_found"
    assert "x-model-version" not in response.headers


def test_a_server_fault_is_a_500_that_says_nothing_of_its_cause(registry, caplog):
    async def work(scope):
        raise KeyError("internal detail")
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        response = run_scope(lifecycle(registry), work)
    assert response.status_code == 500 and body(response) == {"error": "internal error; see server logs"}
    assert "internal detail" in caplog.text  # the log has it, the client does not


def test_work_beyond_the_models_timeout_is_a_504(registry):
    async def work(scope):
        await asyncio.sleep(5)
    response = run_scope(lifecycle(registry), work)
    assert response.status_code == 504 and body(response)["reason"] == "timeout"
    assert "0.2 s" in body(response)["error"]
    fast = run_scope(lifecycle(registry), work, timeout=0.05)  # a route's own timeout wins
    assert fast.status_code == 504 and "0.05 s" in body(fast)["error"]


def test_a_route_that_sets_no_reply_is_a_500(registry):
    async def work(scope):
        pass
    assert run_scope(lifecycle(registry), work).status_code == 500


def test_without_the_token_the_work_never_runs(registry):
    ran = []

    async def work(scope):
        ran.append(True)
        scope.reply({})
    life = lifecycle(registry, TOKEN)
    with pytest.raises(RequestRefused) as refused:
        run_scope(life, work, headers={"Authorization": "Bearer wrong"})
    assert refused.value.response.status_code == 401 and not ran
    assert refused.value.response.headers["www-authenticate"].startswith("Bearer")
    assert body(refused.value.response)["reason"] == "unauthorized"
    assert run_scope(life, work, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert run_scope(life, work, public=True).status_code == 200  # health probes need no token
    assert ran == [True, True]


def test_a_cancelled_request_is_not_turned_into_an_answer(registry):
    async def route():
        async with lifecycle(registry).scope(request(), "v2", "iris"):
            raise asyncio.CancelledError
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(route())


def test_the_access_log_keeps_errors_and_skips_unsampled_successes(registry, caplog):
    async def ok(scope):
        scope.reply({})

    async def bad(scope):
        raise ModelNotFoundError("no such model")
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        run_scope(lifecycle(registry), ok)
        assert not [r for r in caplog.records if getattr(r, "status_code", None) == 200]
        run_scope(lifecycle(registry), bad)
        run_scope(lifecycle(registry, sample_rate=1.0), ok)
    lines = [r for r in caplog.records if hasattr(r, "latency_ms")]
    assert [(r.status_code, r.model_version) for r in lines] == [(404, "1"), (200, "1")]
