"""Versions, the weighted canary, the shadow, the multiplexed long tail, reloads and
zero-downtime traffic changes, against the live cluster's ``fleet`` application (see
conftest.fleet_app: iris 1/2/3 with an 80/20 split and 3 in shadow, diabetes on latest, and
twenty stored models multiplexed four to a replica)."""

from __future__ import annotations

import copy
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import FLEET, FLEET_MAX_MODELS_PER_REPLICA, GUARDED, TAIL_MODELS, SteadyLoad
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

pytestmark = pytest.mark.serve

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [6.0, 2.2, 5.0, 1.5]]


def v2_body(rows, outputs=("predict_proba",)) -> dict:
    return {"inputs": [{"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                        "data": [v for row in rows for v in row]}],
            "outputs": [{"name": o} for o in outputs]}


def output(answer: dict, name: str) -> np.ndarray:
    tensor = next(t for t in answer["outputs"] if t["name"] == name)
    return np.asarray(tensor["data"]).reshape(tensor["shape"])


@pytest.fixture(scope="module")
def fleet(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url + FLEET, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def fleet_store(serve_cluster) -> ModelStore:
    app = next(a for a in serve_cluster.config["applications"] if a["name"] == "fleet")
    return ModelStore(app["args"]["store"])


def metric(serve_cluster, name: str, **labels) -> float:
    return serve_cluster.metric_total(name, application="fleet", **labels)


def wait_for(what: str, condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def settled(read, quiet_s: float = 3.0, timeout: float = 60):
    """A metric reading once it stopped moving (earlier tests' requests are reported with a
    delay of up to a few report intervals)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        current = read()
        if current == last:
            return current
        last = current
    raise AssertionError("the metric never settled")


# -- versions -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_each_live_version_has_its_own_paths(fleet, fleet_store, version):
    expected = load_runtime(fleet_store, "iris", version).predict_proba(np.asarray(IRIS_ROWS))
    answer = fleet.post(f"/v2/models/iris/versions/{version}/infer", json=v2_body(IRIS_ROWS))
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == version and answer.headers["x-model-version"] == version
    np.testing.assert_allclose(output(answer.json(), "predict_proba"), expected, rtol=1e-9)

    v1 = fleet.post(f"/v1/models/iris/versions/{version}:predict", json={"instances": IRIS_ROWS})
    assert v1.status_code == 200 and v1.headers["x-model-version"] == version
    assert v1.json()["predictions"] == load_runtime(fleet_store, "iris", version).predict(
        np.asarray(IRIS_ROWS)).tolist()
    assert fleet.get(f"/v2/models/iris/versions/{version}").json()["versions"] == [version]
    assert fleet.get(f"/v1/models/iris/versions/{version}").json()["version"] == version
    assert fleet.get(f"/v2/models/iris/versions/{version}/ready").status_code == 200
    explained = fleet.post(f"/v1/models/iris/versions/{version}:explain", json={"instances": IRIS_ROWS[:1]})
    assert explained.status_code == 200 and explained.headers["x-model-version"] == version


def test_unversioned_metadata_is_the_default_version_and_absent_versions_are_404(fleet):
    assert fleet.get("/v2/models/iris").json()["versions"] == ["1"]
    for path in ("/v2/models/iris/versions/9/infer", "/v1/models/iris/versions/9:predict"):
        answer = fleet.post(path, json=v2_body(IRIS_ROWS) if "v2" in path else {"instances": IRIS_ROWS})
        assert answer.status_code == 404 and answer.json()["reason"] == "model_not_found", answer.text
        assert "loaded: ['1', '2', '3']" in answer.json()["error"]


# -- the canary split -----------------------------------------------------------------------
def test_canary_split_matches_the_weights_and_sticks_to_a_request_id(fleet):
    """1,200 unversioned requests with fresh ids: version 2's share is 20 % within 4.5
    standard deviations (binomial), version 3 (the shadow) never answers; one id sent again
    and again always gets the same version."""
    n = 1200

    def one(_):
        answer = fleet.post("/v2/models/iris/infer", json=v2_body(IRIS_ROWS[:1], ("predict",)),
                            headers={"X-Request-ID": uuid.uuid4().hex})
        assert answer.status_code == 200, answer.text
        return answer.json()["model_version"]

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(one, range(n)))
    counts = {v: versions.count(v) for v in set(versions)}
    assert set(counts) == {"1", "2"}, counts
    sd = (n * 0.2 * 0.8) ** 0.5
    assert abs(counts["2"] - n * 0.2) < 4.5 * sd, counts

    for _ in range(5):
        request_id = uuid.uuid4().hex
        seen = {fleet.post("/v1/models/iris:predict", json={"instances": IRIS_ROWS[:1]},
                           headers={"X-Request-ID": request_id}).headers["x-model-version"] for _ in range(15)}
        assert len(seen) == 1, (request_id, seen)


# -- the shadow -----------------------------------------------------------------------------
def test_shadow_gets_every_unversioned_request_and_is_measured(serve_cluster, fleet, fleet_store):
    """Version 3 sees a copy of each unversioned request (and of no versioned one); its answers
    never reach the client, but each is counted as matching the served answer or not
    (C=0.001 disagrees with versions 1 and 2 on some rows)."""
    X = np.asarray(IRIS_ROWS)
    labels = {v: load_runtime(fleet_store, "iris", v).predict(X) for v in ("1", "2", "3")}
    assert any(labels["1"] != labels["3"]) and any(labels["1"] == labels["3"]), "fixture versions must differ"

    def shadow_count(outcome):
        return metric(serve_cluster, "ray_serve_app_shadow_requests_total", model="iris", version="3",
                      outcome=outcome)

    before = settled(lambda: {o: shadow_count(o) for o in ("match", "mismatch", "error", "dropped")})
    for i in range(10):  # versioned requests are not mirrored
        assert fleet.post("/v2/models/iris/versions/1/infer", json=v2_body(IRIS_ROWS[:1])).status_code == 200
    sent = {"match": 0, "mismatch": 0}
    for i in range(40):
        row = i % len(IRIS_ROWS)
        answer = fleet.post("/v2/models/iris/infer", json=v2_body([IRIS_ROWS[row]], ("predict",)))
        assert answer.status_code == 200
        served = answer.json()["model_version"]
        assert served in ("1", "2")
        assert output(answer.json(), "predict")[0] == labels[served][row]
        sent["match" if labels[served][row] == labels["3"][row] else "mismatch"] += 1

    def counted():
        deltas = {o: shadow_count(o) - before[o] for o in before}
        return deltas if sum(deltas.values()) >= 40 else None

    deltas = wait_for("the shadow counts", counted)
    time.sleep(2)  # and no more than that arrives
    deltas = {o: shadow_count(o) - before[o] for o in before}
    assert deltas == {**sent, "error": 0, "dropped": 0}, (deltas, sent)
    assert metric(serve_cluster, "ray_serve_app_shadow_latency_ms_count", model="iris", version="3") >= 40


# -- the multiplexed long tail --------------------------------------------------------------
def test_twenty_multiplexed_models_answer_correctly_with_eviction_and_reload(serve_cluster, fleet, fleet_store):
    """Two passes over twenty stored models on one replica that holds four: every answer is
    that model's own, and the replica loaded each model in both passes (evicting as it went)."""
    X = np.asarray(IRIS_ROWS)
    loads_before, unloads_before = settled(lambda: (
        metric(serve_cluster, "ray_serve_multiplexed_models_load_counter_total"),
        metric(serve_cluster, "ray_serve_multiplexed_models_unload_counter_total")))
    expected = {name: load_runtime(fleet_store, name, "1").predict_proba(X) for name in TAIL_MODELS}
    assert len({e.round(6).tobytes() for e in expected.values()}) == len(TAIL_MODELS), "models must differ"
    for _ in range(2):
        for name in TAIL_MODELS:
            answer = fleet.post(f"/v2/models/{name}/infer", json=v2_body(IRIS_ROWS))
            assert answer.status_code == 200, (name, answer.text)
            assert answer.json()["model_name"] == name and answer.json()["model_version"] == "1"
            np.testing.assert_allclose(output(answer.json(), "predict_proba"), expected[name], rtol=1e-9)

    def counted():
        loads = metric(serve_cluster, "ray_serve_multiplexed_models_load_counter_total") - loads_before
        unloads = metric(serve_cluster, "ray_serve_multiplexed_models_unload_counter_total") - unloads_before
        return (loads, unloads) if loads >= 2 * len(TAIL_MODELS) else None

    loads, unloads = wait_for("the multiplexing counters", counted)
    assert unloads >= 2 * len(TAIL_MODELS) - FLEET_MAX_MODELS_PER_REPLICA, (loads, unloads)
    assert metric(serve_cluster, "ray_serve_num_multiplexed_models") <= FLEET_MAX_MODELS_PER_REPLICA


def test_multiplexed_model_metadata_versions_and_unknown_names(fleet):
    assert fleet.get("/v2/models/tail-05").json()["name"] == "tail-05"
    assert fleet.post("/v1/models/tail-05/versions/1:predict", json={"instances": IRIS_ROWS}).status_code == 200
    missing = fleet.post("/v2/models/tail-05/versions/7/infer", json=v2_body(IRIS_ROWS))
    assert missing.status_code == 404 and missing.json()["reason"] == "model_not_found"
    for name in ("no-such-model", "tail-99"):
        answer = fleet.post(f"/v2/models/{name}/infer", json=v2_body(IRIS_ROWS))
        assert answer.status_code == 404 and answer.json()["reason"] == "model_not_found", answer.text
    # A bad body for a multiplexed model is the client's error, as for any other model.
    bad = fleet.post("/v2/models/tail-05/infer", json=v2_body([[1.0, 2.0]]))
    assert bad.status_code == 400 and bad.json()["reason"] == "wrong_shape", bad.text


# -- model management -----------------------------------------------------------------------
def test_repository_index_lists_models_versions_and_traffic(fleet):
    index = fleet.post("/v2/repository/index").json()
    by_key = {(e["name"], e["version"]): e for e in index}
    iris = {v: by_key[("iris", v)] for v in ("1", "2", "3")}
    assert all(e["state"] == "READY" and e["serving"] == "in-process" for e in iris.values())
    assert (iris["1"]["default"], iris["1"]["traffic_percent"]) == (True, 80.0)
    assert (iris["2"]["traffic_percent"], iris["3"]["traffic_percent"], iris["3"]["shadow"]) == (20.0, 0.0, True)
    assert by_key[("diabetes", "1")]["state"] == "READY"
    assert all(by_key[(n, "1")]["serving"] == "multiplexed" for n in TAIL_MODELS)
    assert fleet.get("/v2/repository/index").json() == index
    listed = fleet.get("/v1/models").json()["models"]
    assert {"iris", "diabetes", *TAIL_MODELS} <= set(listed)


def test_reload_serves_a_new_stored_version_without_losing_a_request(serve_cluster, fleet, fleet_store):
    """Train diabetes version 2 into the store, reload through the admin endpoint while
    clients keep calling: every request succeeds, and the answers move to version 2."""
    from serve_app.tools.train import train_model

    assert fleet.post("/v1/models/diabetes:predict", json={"instances": [[0.0] * 10]}).headers[
        "x-model-version"] == "1"
    train_model("diabetes", fleet_store, version="2", alpha=5.0)
    body = {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP64", "data": [0.01] * 10}]}
    with SteadyLoad(serve_cluster.url + FLEET, "/v2/models/diabetes/infer", body) as load:
        time.sleep(1)
        answer = fleet.post("/v2/repository/models/diabetes/load")
        assert answer.status_code == 200, answer.text
        assert answer.json()["replicas_reloaded"] >= 1
        assert [e["version"] for e in answer.json()["versions"]] == ["2"]
        time.sleep(1)
    failures = [o for o in load.outcomes if not o.ok]
    versions = [o.body["model_version"] for o in load.outcomes if o.ok]
    assert failures == [] and versions[0] == "1" and versions[-1] == "2", (failures[:3], versions[:3], versions[-3:])
    # The replica reports what it has loaded now: version 2, and version 1 no more.
    wait_for("model_info of version 2 only", lambda: (
        metric(serve_cluster, "ray_serve_app_model_info", model="diabetes", version="2") == 1
        and metric(serve_cluster, "ray_serve_app_model_info", model="diabetes", version="1") == 0))

    # A multiplexed model reloads too: the next request loads the new version.
    train_model("iris", fleet_store, version="2", save_as="tail-07", C=3.0)
    assert fleet.post("/v2/models/tail-07/infer", json=v2_body(IRIS_ROWS)).json()["model_version"] == "1"
    assert fleet.post("/v2/repository/models/tail-07/load").status_code == 200
    assert fleet.post("/v2/models/tail-07/infer", json=v2_body(IRIS_ROWS)).json()["model_version"] == "2"

    missing = fleet.post("/v2/repository/models/no-such-model/load")
    assert missing.status_code == 404 and missing.json()["reason"] == "model_not_found"


def test_a_reload_that_cannot_load_keeps_the_old_version(serve_cluster, fleet, fleet_store):
    """A stored version 3 whose artifact does not match its sha256: the reload answers 409
    (reload_failed) and version 2 keeps answering."""
    from serve_app.tools.train import train_model

    meta = train_model("diabetes", fleet_store, version="3")
    version_dir = Path(fleet_store.uri) / "diabetes" / "3"
    (version_dir / meta.artifact).write_bytes(b"not the model that was trained")
    try:
        answer = fleet.post("/v2/repository/models/diabetes/load")
        assert answer.status_code == 409 and answer.json()["reason"] == "reload_failed", answer.text
        after = fleet.post("/v1/models/diabetes:predict", json={"instances": [[0.0] * 10]})
        assert after.status_code == 200 and after.headers["x-model-version"] == "2"
    finally:
        shutil.rmtree(version_dir)  # later redeploys load "latest" again


def test_admin_endpoints_want_the_token_when_one_is_set(serve_cluster):
    url = serve_cluster.url + GUARDED
    for method, path in (("POST", "/v2/repository/models/iris/load"), ("POST", "/v2/repository/index"),
                         ("GET", "/v2/repository/index")):
        answer = httpx.request(method, url + path, timeout=60)
        assert answer.status_code == 401 and answer.json()["reason"] == "unauthorized", (path, answer.text)
    headers = {"Authorization": f"Bearer {serve_cluster.api_token}"}
    assert httpx.post(url + "/v2/repository/models/iris/load", headers=headers, timeout=90).status_code == 200
    assert httpx.get(url + "/v2/repository/index", headers=headers, timeout=60).status_code == 200
    # Reloading an unchanged version keeps its model_info (the old worker closes after the new loads).
    time.sleep(5)  # several report intervals: a dropped gauge would be gone by now
    assert serve_cluster.metric_total("ray_serve_app_model_info", application="guarded", model="iris") >= 1


# -- updates without downtime ---------------------------------------------------------------
def test_changing_the_split_under_load_loses_no_request(serve_cluster, fleet):
    """Redeploy the fleet with iris at 50/50 (Serve's REST API, as KubeRay does) while
    clients keep sending: no request fails, and afterwards the split is the new one."""
    config = copy.deepcopy(serve_cluster.config)
    app = next(a for a in config["applications"] if a["name"] == "fleet")
    iris = next(m for m in app["args"]["models"] if m["name"] == "iris")
    iris["traffic"] = {"1": 50, "2": 50}
    body = v2_body(IRIS_ROWS[:1], ("predict",))
    with SteadyLoad(serve_cluster.url + FLEET, "/v2/models/iris/infer", body) as load:
        time.sleep(2)
        with serve_cluster.serve_api() as api:
            assert api.put("/api/serve/applications/", json=config).status_code == 200
        serve_cluster.config["applications"] = config["applications"]  # later redeploys carry it on

        def split_is_new():
            index = fleet.get("/v2/repository/index").json()
            return next(e for e in index if (e["name"], e["version"]) == ("iris", "2"))["traffic_percent"] == 50.0
        wait_for("the new split", split_is_new, timeout=180)
        time.sleep(2)
    failures = [o for o in load.outcomes if not o.ok]
    assert len(load.outcomes) > 50 and failures == [], failures[:5]
    versions = [fleet.post("/v2/models/iris/infer", json=body).json()["model_version"] for _ in range(400)]
    sd = (400 * 0.25) ** 0.5
    assert abs(versions.count("2") - 200) < 4.5 * sd, versions.count("2")


def test_a_rollout_through_user_config_changes_the_running_replica_in_place(serve_cluster, fleet):
    """The split changed through the ingress's ``user_config`` (serve_app.config.Rollout), not
    its args: Serve reconfigures the running ingress replica instead of rebuilding the
    application. Under steady load no request fails, the replica is the same one, and the new
    split serves; an empty ``models`` brings back what args declare."""
    def put_rollout(models: dict) -> None:
        config = copy.deepcopy(serve_cluster.config)
        app = next(a for a in config["applications"] if a["name"] == "fleet")
        next(d for d in app["deployments"] if d["name"] == "ModelServer")["user_config"] = {"models": models}
        with serve_cluster.serve_api() as api:
            assert api.put("/api/serve/applications/", json=config).status_code == 200

    def ingress_replicas() -> set[str]:
        with serve_cluster.serve_api() as api:
            deployments = api.get("/api/serve/applications/").json()["applications"]["fleet"]["deployments"]
        return {r["replica_id"] for r in deployments["ModelServer"]["replicas"] if r["state"] == "RUNNING"}

    def share_of_2() -> float:
        index = fleet.get("/v2/repository/index").json()
        return next(e for e in index if (e["name"], e["version"]) == ("iris", "2"))["traffic_percent"]

    declared = share_of_2()
    before = ingress_replicas()
    body = v2_body(IRIS_ROWS[:1], ("predict",))
    try:
        with SteadyLoad(serve_cluster.url + FLEET, "/v2/models/iris/infer", body) as load:
            time.sleep(1)
            put_rollout({"iris": {"version": "1", "traffic": {"1": 10, "2": 90}}})
            wait_for("the user_config split", lambda: share_of_2() == 90.0, timeout=120)
            time.sleep(1)
        failures = [o for o in load.outcomes if not o.ok]
        assert len(load.outcomes) > 50 and failures == [], failures[:5]
        assert ingress_replicas() == before
        versions = [fleet.post("/v2/models/iris/infer", json=body).json()["model_version"] for _ in range(400)]
        sd = (400 * 0.09) ** 0.5
        assert abs(versions.count("2") - 360) < 4.5 * sd, versions.count("2")
    finally:  # later tests expect the fleet as args declare it (a config without user_config would not undo it)
        put_rollout({})
    wait_for("the args' split again", lambda: share_of_2() == declared, timeout=120)
    assert ingress_replicas() == before
