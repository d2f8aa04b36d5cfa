"""Reliability and security against the live cluster: bearer-token auth on the data plane,
per-model timeouts that answer instead of hanging, health checks that see a broken model, and a
killed replica under load (failed requests counted, replacement observed)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from sklearn.datasets import load_breast_cancer

from conftest import GUARDED, SteadyLoad
from serve_app.config import ModelSpec
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore
from serve_app.serving.worker import ModelWorker

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
BODY = {"instances": [IRIS_ROW]}


# -- authentication ------------------------------------------------------------------------------
@pytest.fixture()
def guarded(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url + GUARDED, timeout=30) as client:
        yield client


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.serve
@pytest.mark.parametrize("headers", [{}, bearer("wrong-token"), {"Authorization": "Basic dXNlcjpwYXNz"},
                                     {"Authorization": "Bearer"}],
                         ids=["no token", "wrong token", "other scheme", "empty bearer"])
def test_data_plane_refuses_missing_or_wrong_token(guarded, headers):
    for method, path, kwargs in [("POST", "/v1/models/iris:predict", {"json": BODY}),
                                 ("GET", "/v1/models", {}), ("GET", "/v1/models/iris", {}),
                                 ("GET", "/v2/models/iris", {}),
                                 ("POST", "/v2/models/iris/infer",
                                  {"json": {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                                        "data": IRIS_ROW}]}})]:
        response = guarded.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 401, f"{method} {path}: {response.status_code}"
        assert response.json()["reason"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.serve
def test_right_token_is_served_and_probes_stay_open(guarded, serve_cluster):
    ok = guarded.post("/v1/models/iris:predict", json=BODY, headers=bearer(serve_cluster.api_token))
    assert ok.status_code == 200 and ok.json() == {"predictions": [0]}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/iris/ready", "/v2"):
        assert guarded.get(path).status_code == 200, path
    # The open application next to it is unaffected.
    assert httpx.post(serve_cluster.url + "/v1/models/iris:predict", json=BODY).status_code == 200


# -- timeouts ------------------------------------------------------------------------------------
@pytest.mark.serve
def test_slow_model_times_out_clearly_and_the_replica_stays_usable(guarded, serve_cluster):
    headers = bearer(serve_cluster.api_token)
    row = load_breast_cancer().data[:1].tolist()
    slow = guarded.post("/v1/models/breast-cancer:predict", json={"instances": row}, headers=headers)
    assert slow.status_code == 504
    assert slow.json()["reason"] == "timeout" and "0.3 s" in slow.json()["error"]
    # The same replica answers at once: another model, and this model with a full batch.
    assert guarded.post("/v1/models/iris:predict", json=BODY, headers=headers).status_code == 200
    full = load_breast_cancer().data[:64].tolist()
    answer = guarded.post("/v1/models/breast-cancer:predict", json={"instances": full}, headers=headers)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 64
    assert guarded.get("/v2/health/ready").status_code == 200


# -- health checks -------------------------------------------------------------------------------
def test_health_check_fails_when_the_model_breaks(tmp_path):
    from serve_app.tools.train import ensure_models

    store = ModelStore(str(tmp_path))
    ensure_models(store, ["iris"])
    worker = ModelWorker(load_runtime(store, "iris", "latest"), ModelSpec(name="iris"))
    asyncio.run(worker.check())  # a working model passes

    def broken(X):
        raise MemoryError("model state lost")

    worker.runtime.predict = broken
    with pytest.raises(MemoryError):
        asyncio.run(worker.check())


# -- a replica killed under load -----------------------------------------------------------------
def ingress_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::models#ModelServer#")}


@pytest.mark.serve
@pytest.mark.slow
def test_killed_replica_is_replaced_and_few_requests_fail(serve_cluster):
    import ray

    before = ingress_replicas()
    assert len(before) >= 2, f"need two ingress replicas to kill one: {before}"
    with SteadyLoad(serve_cluster.url, "/v1/models/iris:predict", BODY) as load:
        time.sleep(3)
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        replaced_at = None
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            now = ingress_replicas()
            if victim not in now and now - before:
                replaced_at = time.monotonic()
                break
            time.sleep(0.5)
        time.sleep(10)  # keep the load on after the replacement: the window is kill + 10 s

    window = load.since(killed_at)
    failed = sum(not o.ok for o in window)
    last_failure = max((o.at for o in window if not o.ok), default=killed_at)
    print(f"\nreplica kill: {failed}/{len(window)} failed requests after the kill "
          f"({100 * failed / max(len(window), 1):.2f}%), last failure {last_failure - killed_at:.1f} s "
          f"after it, replacement replica up after {(replaced_at or float('nan')) - killed_at:.1f} s")
    assert replaced_at is not None, "the killed replica was never replaced"
    assert len(window) > 100, "the load generator did not run"
    assert failed <= 0.01 * len(window), f"{failed} of {len(window)} requests failed"


# -- a new model version deployed under load -----------------------------------------------------
@pytest.mark.serve
@pytest.mark.slow
def test_redeploying_a_new_version_under_load_loses_no_request(serve_cluster):
    """Train iris version 2, PUT the changed config to Serve's REST API (what KubeRay and
    `serve deploy` do) while clients keep sending V2 requests: every request succeeds, and the
    answers move from version 1 to version 2."""
    import copy

    from serve_app.tools.train import train_model

    guarded = next(a for a in serve_cluster.config["applications"] if a["name"] == "guarded")
    store = ModelStore(guarded["args"]["store"])
    train_model("iris", store, version="2", C=0.5)
    headers = bearer(serve_cluster.api_token)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]}
    with SteadyLoad(serve_cluster.url + GUARDED, "/v2/models/iris/infer", body, headers) as load:
        time.sleep(2)
        config = copy.deepcopy(serve_cluster.config)
        changed = next(a for a in config["applications"] if a["name"] == "guarded")
        next(m for m in changed["args"]["models"] if m["name"] == "iris")["version"] = "2"
        with serve_cluster.serve_api() as api:
            assert api.put("/api/serve/applications/", json=config).status_code == 200
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (
                len(load.outcomes) > 20 and all(o.ok and o.body["model_version"] == "2" for o in load.outcomes[-20:])):
            time.sleep(0.5)
        time.sleep(2)

    outcomes = load.outcomes
    failures = [o for o in outcomes if not o.ok]
    versions = [o.body["model_version"] for o in outcomes if o.ok]
    print(f"\nredeploy: {len(outcomes)} requests, {len(failures)} failed; "
          f"{versions.count('1')} answered by v1, {versions.count('2')} by v2")
    assert failures == [], failures[:5]
    assert versions[0] == "1" and versions[-1] == "2", "the new version never took over"
