"""Local parity with the production RayService, without a Kubernetes cluster.

The test renders cluster/overlays/prod, takes the RayService's serveConfigV2, and starts a local
multi-node Ray shaped like its RayCluster: a head started with the head group's rayStartParams
(``num-cpus: "0"``) and, per worker group, ``minReplicas`` worker nodes sized from the container's
limits, as KubeRay turns them into ``ray start`` flags, with the containers' environment (the
HAProxy fast path, ``SERVE_APP_STORE``) and token authentication on. It deploys the config the
way the KubeRay operator does, a PUT to the dashboard's Serve REST API, and then checks what
KubeRay and the users depend on: every model answers correctly through every node's ingress, the
probes KubeRay runs pass on every node, and no replica runs on the head.

On one shared machine a few values must differ from the Pods, each of which has its own network
namespace: ports (all free ones here, the HTTP port included) and the model store (a temporary
one, through the same ``SERVE_APP_STORE`` override the Pods use). The test asserts that the HTTP
port is the only difference between the deployed config and serveConfigV2.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import yaml
from sklearn import datasets

from conftest import SteadyLoad, free_port, require_tool
from test_manifests import ray_start_flags
from serve_app.codecs import tables
from serve_app.tools import manifests
from serve_app.tools.train import table_split
from serve_app.tools.localserve import haproxy_paths, stop_orphaned_haproxy, stop_ray_cluster
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

pytestmark = [pytest.mark.serve, pytest.mark.slow]

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 600  # a readiness wait, never a performance bound: the machine may be busy
DATASETS = {"iris": datasets.load_iris, "breast-cancer": datasets.load_breast_cancer,
            "diabetes": datasets.load_diabetes, "wine": datasets.load_wine}
def container_env(group: dict) -> dict[str, str]:
    """The literal env values of the group's Ray container (Secret references are KubeRay's)."""
    env = group["template"]["spec"]["containers"][0].get("env", [])
    return {e["name"]: e["value"] for e in env if "value" in e}


@dataclass
class LocalNode:
    role: str
    serve_port: int  # the port its HAProxy binds (8000 in every Pod)
    agent_port: int  # the dashboard agent, where KubeRay's probes ask for raylet health
    flags: dict[str, str]
    haproxy_ports: list[int] = field(default_factory=list)
    grpc_port: int = field(default_factory=free_port)  # its HAProxy's gRPC frontend (9000 in every Pod)


@dataclass
class LocalCluster:
    dashboard: str
    token: str
    nodes: list[LocalNode]
    serve_config: dict  # serveConfigV2 as rendered
    deployed: dict  # what was PUT to the dashboard
    store: Path
    serving: list[LocalNode] = field(default_factory=list)  # nodes whose ingress is ready

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.dashboard, timeout=30,
                            headers={"Authorization": f"Bearer {self.token}"})


def _start_node(node: LocalNode, env: dict, temp_dir: Path, log_dir: Path, head_gcs: str | None) -> None:
    """``ray start`` as KubeRay's container command runs it, with this node's flags.

    Not ``--block``: the processes outlive the command, and teardown finds them by the cluster's
    temp dir. Its exit status is not trusted either: under load a node can register after
    ``ray start`` gave up waiting (a fixed 30 s), so readiness is read from the cluster instead.
    """
    args = [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", *(f"--{k}={v}" for k, v in node.flags.items())]
    args += ["--head"] if head_gcs is None else [f"--address={head_gcs}"]
    with open(log_dir / f"{node.role}.log", "w") as log:
        subprocess.run(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)


def _wait(what: str, probe) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {READY_TIMEOUT_S}s")


def _healthy(node: LocalNode) -> bool:
    try:
        response = httpx.get(f"http://127.0.0.1:{node.serve_port}/-/healthz", timeout=10)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "success" in response.text


def _alive_nodes(api: httpx.Client) -> list[dict]:
    nodes = api.get("/api/v0/nodes", params={"limit": 100}).json()["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


@pytest.fixture(scope="module")
def prod_like(tmp_path_factory) -> LocalCluster:
    require_tool("kubectl")
    rayservice = manifests.the_rayservice(manifests.render(manifests.ROOT / "cluster/overlays/prod"))
    cluster_spec = rayservice["spec"]["rayClusterConfig"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])

    work = tmp_path_factory.mktemp("parity")
    store = work / "model_store"
    temp_dir = Path(tempfile.mkdtemp(prefix="rayp-", dir="/tmp"))  # short: socket paths < 108 bytes
    token = secrets.token_hex(32)  # what authOptions' Secret gives every Ray container
    gcs_port, dashboard_port = free_port(), free_port()

    head_group = cluster_spec["headGroupSpec"]
    head_flags = {**ray_start_flags(head_group), "port": str(gcs_port), "dashboard-port": str(dashboard_port),
                  "dashboard-host": "127.0.0.1", "ray-client-server-port": str(free_port())}
    nodes = [LocalNode("head", free_port(), free_port(), head_flags)]
    envs = [container_env(head_group)]
    for group in cluster_spec["workerGroupSpecs"]:
        for i in range(group["minReplicas"]):
            nodes.append(LocalNode(f"{group['groupName']}-{i}", free_port(), free_port(), ray_start_flags(group)))
            envs.append(container_env(group))
    # Serve's fallback proxy (HAProxy's backup server, on the head; 8500/9500 in a Pod).
    fallback_ports = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                      "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())}
    for node, env in zip(nodes, envs):
        node.flags.update({"metrics-export-port": str(free_port()),
                           "dashboard-agent-listen-port": str(node.agent_port),
                           # Every node shares this machine's /dev/shm: keep each object store small.
                           "object-store-memory": str(200 * 2**20)})
        node.haproxy_ports = [node.serve_port, free_port(), free_port()]
        env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "SERVE_APP_STORE": str(store),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(node.haproxy_ports[1]),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(node.haproxy_ports[2]),
            **fallback_ports,
            # Each node's HAProxy files of its own (the default /tmp/haproxy-serve is per machine).
            **haproxy_paths(temp_dir / f"n{nodes.index(node)}"),
        })
        if node.role != "head":  # the head's HAProxy binds http_options.port and grpc_options.port
            env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(node.serve_port)
            env["RAY_SERVE_WORKER_PROXY_GRPC_PORT"] = str(node.grpc_port)

    deployed = copy.deepcopy(serve_config)
    deployed["http_options"]["port"] = nodes[0].serve_port
    deployed["grpc_options"]["port"] = nodes[0].grpc_port
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    local = LocalCluster(dashboard, token, nodes, serve_config, deployed, store)
    try:
        _start_node(nodes[0], {**os.environ, **envs[0]}, temp_dir, work, None)
        with local.api() as api:
            _wait("the head's dashboard", lambda: api.get("/api/gcs_healthz").status_code == 200)
            # One node at a time, as a busy 2-core machine registers them reliably.
            for count, (node, env) in enumerate(zip(nodes[1:], envs[1:]), start=2):
                _start_node(node, {**os.environ, **env}, temp_dir, work, f"127.0.0.1:{gcs_port}")
                _wait(f"worker node {node.role}", lambda: len(_alive_nodes(api)) == count)
            # As the KubeRay operator deploys serveConfigV2 (JSON, to the Serve REST API).
            response = api.put("/api/serve/applications/", json=deployed)
            assert response.status_code == 200, response.text

            def running() -> bool:
                apps = api.get("/api/serve/applications/").json()["applications"]
                failed = {n: a["message"] for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
                assert not failed, failed
                return bool(apps) and all(a["status"] == "RUNNING" for a in apps.values())

            _wait("the Serve applications", running)

            # KubeRay's readiness: a Pod serves once Serve's /-/healthz on its serve port says so.
            # Serve runs an ingress on the head and on every node that hosts a replica.
            def ingresses_ready() -> bool:
                proxies = api.get("/api/serve/applications/").json()["proxies"].values()
                local.serving = [n for n in nodes if _healthy(n)]
                return (all(p["status"] == "HEALTHY" for p in proxies)
                        and len(local.serving) == len(proxies) and nodes[0] in local.serving)

            _wait("every node's ingress", ingresses_ready)
        yield local
    except BaseException:
        for log in sorted(work.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop_ray_cluster(temp_dir)  # this cluster's processes only: never another Ray beside it
        for node in nodes:
            for port in node.haproxy_ports:
                stop_orphaned_haproxy(port)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
def _replica_nodes(api: httpx.Client) -> dict[str, list[str]]:
    """Node id of every RUNNING replica, by deployment."""
    apps = api.get("/api/serve/applications/").json()["applications"]
    return {f"{app}/{name}": [r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"]
            for app, a in apps.items() for name, d in a["deployments"].items()}


def _node_processes(node: LocalNode) -> list:
    """Every process of one local node: they all carry its worker-proxy port in their environment."""
    import psutil

    port = str(node.serve_port)
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.environ().get("RAY_SERVE_WORKER_PROXY_HTTP_PORT") == port:
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return mine


def test_losing_a_worker_node_under_load_reschedules_its_replicas(prod_like):
    """Kill every process of one worker node (raylet, agents, replicas, HAProxy) while clients
    send requests through the head's ingress: the replicas come back on the surviving worker and
    serving goes on. Errors and recovery time are printed (docs/reliability-security.md)."""
    import psutil

    workers = prod_like.nodes[1:]
    assert len(workers) >= 2, "the prod shape needs two worker nodes for this test"
    with prod_like.api() as api:
        ingress = "models/ModelServer"
        # Serve spreads replicas over nodes: the ingress's two replicas sit on both workers.
        _wait("ingress replicas on both workers", lambda: len(set(_replica_nodes(api)[ingress])) >= 2)
        before = _replica_nodes(api)

    victim = workers[-1]
    victim_processes = _node_processes(victim)
    assert victim_processes, "found no process of the victim node"

    row = DATASETS["iris"]().data[:1].tolist()
    head = f"http://127.0.0.1:{prod_like.nodes[0].serve_port}"
    with SteadyLoad(head, "/v1/models/iris:predict", {"instances": row}) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        for proc in victim_processes:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        with prod_like.api() as api:
            _wait("the lost node's replicas rescheduled on the survivor",
                  lambda: len(_alive_nodes(api)) == len(prod_like.nodes) - 1
                  and all(len(nodes) >= len(before[name]) for name, nodes in _replica_nodes(api).items()))
            recovered_at = time.monotonic()
            after = _replica_nodes(api)
            survivors = {n["node_id"] for n in _alive_nodes(api)}
        time.sleep(5)

    window = load.since(killed_at)
    failed = sum(not o.ok for o in window)
    last_failure = max((o.at for o in window if not o.ok), default=killed_at)
    print(f"\nnode loss: {failed}/{len(window)} requests failed; last failure {last_failure - killed_at:.1f} s "
          f"after the kill; replicas back to strength {recovered_at - killed_at:.1f} s after it")
    assert all(set(nodes) <= survivors for nodes in after.values()), after
    assert all(o.ok for o in window[-20:]), "serving did not recover"

