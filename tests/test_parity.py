"""Local parity with the production RayService, without a Kubernetes cluster.

The fixture starts the prod overlay's RayCluster locally (tests/local_cluster.py: a head with
``num-cpus: "0"``, the worker groups' minimum of workers, the containers' environment, token
authentication, GCS fault tolerance on a real Redis) and deploys serveConfigV2 as the KubeRay
operator does, a PUT to the dashboard's Serve REST API. The tests check what KubeRay and the users
depend on: every model answers correctly through every node's ingress, the probes KubeRay runs
pass on every node, and no replica runs on the head. The HTTP and gRPC ports are the only
difference between the deployed config and serveConfigV2 (a test asserts it).
"""

from __future__ import annotations

import re
import secrets
import time

import httpx
import numpy as np
import orjson
import pytest
import yaml
from sklearn import datasets

from conftest import SteadyLoad
from local_cluster import LocalCluster, prod_like_cluster, redis_server, wait_for
from serve_app.codecs import tables
from serve_app.tools import manifests
from serve_app.tools.train import table_split
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

pytestmark = [pytest.mark.serve, pytest.mark.slow]

DATASETS = {"iris": datasets.load_iris, "breast-cancer": datasets.load_breast_cancer,
            "diabetes": datasets.load_diabetes, "wine": datasets.load_wine}


@pytest.fixture(scope="module")
def prod_like(tmp_path_factory) -> LocalCluster:
    work = tmp_path_factory.mktemp("parity")
    with redis_server(work, secrets.token_hex(16)) as redis, prod_like_cluster(work, redis) as cluster:
        yield cluster


def test_the_local_cluster_has_the_prod_shape(prod_like):
    head, workers = prod_like.nodes[0], prod_like.nodes[1:]
    assert head.flags["num-cpus"] == "0"
    assert workers and all(float(w.flags["num-cpus"]) >= 1 for w in workers)
    with prod_like.api() as api:
        details = api.get("/api/serve/applications/").json()
    # The Serve controller lives on the head; with num-cpus 0 there, every replica is elsewhere.
    head_node_id = details["controller_info"]["node_id"]
    replicas = [r for app in details["applications"].values()
                for d in app["deployments"].values() for r in d["replicas"]]
    assert replicas and all(r["state"] == "RUNNING" for r in replicas)
    assert head_node_id not in {r["node_id"] for r in replicas}
    # An HAProxy ingress on the head and on every node with a replica, as in the Pods; a worker
    # without one fails KubeRay's readiness probe and stays out of the serve Service.
    assert set(details["proxies"]) == {head_node_id} | {r["node_id"] for r in replicas}
    assert len(prod_like.serving) == len(details["proxies"])


def test_the_deployed_config_is_serve_config_v2_but_for_the_ports(prod_like):
    assert prod_like.serve_config == yaml.safe_load((manifests.ROOT / manifests.SERVE_CONFIG).read_text())
    differences = {k for k in prod_like.serve_config if prod_like.serve_config[k] != prod_like.deployed[k]}
    assert differences == {"http_options", "grpc_options"}
    assert {**prod_like.deployed["http_options"], "port": 8000} == prod_like.serve_config["http_options"]
    assert {**prod_like.deployed["grpc_options"], "port": 9000} == prod_like.serve_config["grpc_options"]
    with prod_like.api() as api:
        apps = api.get("/api/serve/applications/").json()["applications"]
    assert {name: app["deployed_app_config"]["import_path"] for name, app in apps.items()} == {
        app["name"]: app["import_path"] for app in prod_like.serve_config["applications"]}


def test_kuberay_probes_pass(prod_like):
    """What KubeRay asks of the Pods: raylet health from every node's dashboard agent, the GCS's
    health from the head's dashboard, and Serve's /-/healthz on the serve port of every node
    that serves (answered by HAProxy, the fast path), all without the Ray token."""
    for node in prod_like.nodes:
        raylet = httpx.get(f"http://127.0.0.1:{node.agent_port}/api/local_raylet_healthz", timeout=10)
        assert raylet.status_code == 200 and "success" in raylet.text, node.role
    gcs = httpx.get(f"{prod_like.dashboard}/api/gcs_healthz", timeout=10)
    assert gcs.status_code == 200 and "success" in gcs.text
    assert prod_like.serving[0] is prod_like.nodes[0]
    for node in prod_like.serving:
        serve = httpx.get(f"http://127.0.0.1:{node.serve_port}/-/healthz", timeout=10)
        assert serve.status_code == 200 and serve.text == "success", node.role


def test_every_nodes_haproxy_exports_its_metrics(prod_like):
    """What the PodMonitors scrape on the port named haproxy-metrics: HAProxy's own Prometheus
    exporter, on every node that serves, with the serving frontend and its backends."""
    for node in prod_like.serving:
        response = httpx.get(f"http://127.0.0.1:{node.haproxy_ports[2]}/metrics", timeout=10)
        assert response.status_code == 200, node.role
        assert 'haproxy_frontend_http_requests_total{proxy="http_frontend"}' in response.text, node.role
        assert re.search(r'^haproxy_(backend|server)_\w+\{proxy="http-[^"]+"', response.text, re.M), node.role


def test_token_authentication_is_on(prod_like):
    assert httpx.get(f"{prod_like.dashboard}/api/serve/applications/", timeout=10).status_code == 401
    with prod_like.api() as api:
        assert api.get("/api/serve/applications/").status_code == 200


def test_every_model_answers_correctly_through_every_ingress(prod_like):
    models = [m["name"] for app in prod_like.serve_config["applications"] for m in app["args"]["models"]]
    store = ModelStore(str(prod_like.store))
    reference = {name: load_runtime(store, name) for name in models}
    assert len(prod_like.serving) >= 2  # the head's and at least one worker's
    for node in prod_like.serving:
        with httpx.Client(base_url=f"http://127.0.0.1:{node.serve_port}", timeout=60) as client:
            assert client.get("/v1/models").json() == {"models": sorted(models)}, node.role
            for name in models:
                instances, expected = reference_rows(name, reference[name])
                response = client.post(f"/v1/models/{name}:predict", json={"instances": instances})
                assert response.status_code == 200, (node.role, name, response.text)
                answered = response.json()["predictions"]
                if reference[name].meta.is_classifier:
                    assert answered == expected.tolist(), f"{name} via {node.role}"
                else:
                    np.testing.assert_allclose(answered, expected, rtol=1e-6, err_msg=f"{name} via {node.role}")


def reference_rows(name: str, runtime) -> tuple[list, np.ndarray]:
    """Rows for model ``name`` as a V1 client sends them, and the runtime's own answers to them
    (mixed-type models: records of the customer table, decoded as the server decodes them)."""
    if not runtime.meta.is_tabular:
        X = DATASETS[name]().data[::25]
        return X.tolist(), runtime.predict(X)
    records = orjson.loads(table_split(name).X_test.iloc[::25].to_json(orient="records"))
    inputs = tables.from_records(records, runtime.meta, runtime.accepts_missing)
    return records, np.asarray(runtime.predict(runtime.prepare(inputs.data)))


# -- a worker node lost under load (runs last: it changes the cluster) ----------------------------
def replica_nodes(cluster: LocalCluster) -> dict[str, list[str]]:
    """Node id of every RUNNING replica, by deployment."""
    apps = cluster.applications()["applications"]
    return {f"{app}/{name}": [r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"]
            for app, a in apps.items() for name, d in a["deployments"].items()}


def test_losing_a_worker_node_under_load_reschedules_its_replicas(prod_like):
    """Kill every process of one worker node (raylet, agents, replicas, HAProxy) while clients
    send requests through the head's ingress: the replicas come back on the surviving worker and
    serving goes on. Errors and recovery time are printed (docs/reliability-security.md)."""
    workers = prod_like.nodes[1:]
    assert len(workers) >= 2, "the prod shape needs two worker nodes for this test"
    ingress = "models/ModelServer"
    # Serve spreads replicas over nodes: the ingress's two replicas sit on both workers.
    wait_for("ingress replicas on both workers", lambda: len(set(replica_nodes(prod_like)[ingress])) >= 2)
    before = replica_nodes(prod_like)

    row = DATASETS["iris"]().data[:1].tolist()
    with SteadyLoad(prod_like.head.url, "/v1/models/iris:predict", {"instances": row}) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        assert workers[-1].kill(), "found no process of the victim node"
        wait_for("the lost node's replicas rescheduled on the survivor",
                 lambda: len(prod_like.alive_nodes()) == len(prod_like.nodes) - 1
                 and all(len(nodes) >= len(before[name]) for name, nodes in replica_nodes(prod_like).items()))
        recovered_at = time.monotonic()
        after = replica_nodes(prod_like)
        survivors = {n["node_id"] for n in prod_like.alive_nodes()}
        time.sleep(5)

    window = load.since(killed_at)
    failed = sum(not o.ok for o in window)
    last_failure = max((o.at for o in window if not o.ok), default=killed_at)
    print(f"\nnode loss: {failed}/{len(window)} requests failed; last failure {last_failure - killed_at:.1f} s "
          f"after the kill; replicas back to strength {recovered_at - killed_at:.1f} s after it")
    assert all(set(nodes) <= survivors for nodes in after.values()), after
    assert all(o.ok for o in window[-20:]), "serving did not recover"
