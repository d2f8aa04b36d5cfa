"""A local multi-node Ray shaped like the prod overlay's RayCluster, and a real Redis for its GCS.

``prod_like_cluster`` renders cluster/overlays/prod and starts, on this one machine, what KubeRay
starts from its RayService: a head with the head group's rayStartParams (``num-cpus: "0"``) and,
per worker group, ``minReplicas`` worker nodes sized from the container's limits, each with its
container's environment (the HAProxy fast path, ``SERVE_APP_STORE``) and token authentication.
GCS fault tolerance is set up as KubeRay sets it up for ``gcsFaultToleranceOptions``: the head
gets ``RAY_REDIS_ADDRESS``, ``--redis-password`` and ``RAY_external_storage_namespace`` (KubeRay:
the RayCluster's UID), the workers ``RAY_gcs_rpc_server_reconnect_timeout_s=600`` (KubeRay's
default, so that raylets outlive a head restart). Serve's config is deployed the way the operator
deploys serveConfigV2: a PUT to the dashboard's Serve REST API.

On one shared machine a few values differ from the Pods, each of which has a network namespace of
its own: ports (free ones, the HTTP port included), the model store (a temporary one, through the
same ``SERVE_APP_STORE`` override the Pods use) and the Redis (``redis_server``: Debian's
redis-server on loopback, where the overlay runs components/redis in the namespace).

Ports Ray picks itself stay as in the Pods, and two of them are shared here. Serve's fallback proxy
port (``RAY_SERVE_FALLBACK_PROXY_HTTP_PORT``, one free port for every node) is only bound on the
head (Ray starts the fallback proxy there alone), so nothing collides. The replicas' direct-ingress
ports come from the controller's per-node allocator, which starts every node at 30000 (HTTP) and
40000 (gRPC), as it would in every Pod: an HTTP replica whose port another node's replica holds
fails to bind and is given the next one (each node's HAProxy lists distinct ``127.0.0.1`` ports),
while the replicas' gRPC servers set SO_REUSEPORT and share 40000, so the kernel spreads gRPC
connections over the replicas of both workers where a Pod's address names one. The HTTP rollout of
tests/test_head_loss.py is unaffected: the same rollout on this cluster without a head loss loses
no request.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import yaml

from conftest import BIN, free_port, require_tool
from test_manifests import ray_start_flags
from serve_app.tools import manifests
from serve_app.tools.localserve import haproxy_paths, stop_orphaned_haproxy, stop_ray_cluster

READY_TIMEOUT_S = 600  # a readiness wait, never a performance bound: the machine may be busy
# KubeRay's DefaultWorkerRayGcsReconnectTimeoutS, set on every worker when GCS FT is on.
KUBERAY_WORKER_GCS_RECONNECT_TIMEOUT_S = "600"


# -- Redis --------------------------------------------------------------------------------------
@dataclass
class RedisServer:
    port: int
    password: str
    cli: list[str]  # redis-cli with the address, TLS options and password
    address: str  # as gcsFaultToleranceOptions.redisAddress names it
    ca: Path | None  # the CA of a TLS Redis's certificate

    def keys(self, pattern: str) -> list[str]:
        return subprocess.run([*self.cli, "--scan", "--pattern", pattern],
                              capture_output=True, text=True, check=True).stdout.split()


@contextmanager
def redis_server(work: Path, password: str, tls_dir: Path | None = None) -> Iterator[RedisServer]:
    """Debian's redis-server on a free loopback port, with a password and no persistence; TLS
    only when ``tls_dir`` holds server.crt, server.key and ca.crt (as a managed Redis serves)."""
    require_tool("redis-server")
    require_tool("redis-cli")
    port = free_port()
    args = ["--bind", "127.0.0.1", "--requirepass", password, "--save", "", "--appendonly", "no",
            "--dir", str(work)]
    cli = ["redis-cli", "--no-auth-warning", "-a", password, "-p", str(port)]
    if tls_dir is None:
        args += ["--port", str(port)]
        cli += ["-h", "127.0.0.1"]
        address = f"redis://127.0.0.1:{port}"
    else:
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_dir / "server.crt"),
                 "--tls-key-file", str(tls_dir / "server.key"), "--tls-ca-cert-file", str(tls_dir / "ca.crt"),
                 "--tls-auth-clients", "no"]
        cli += ["--tls", "--cacert", str(tls_dir / "ca.crt"), "-h", "localhost"]
        address = f"rediss://localhost:{port}"  # the name its certificate carries
    server = subprocess.Popen(["redis-server", *args], cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if subprocess.run([*cli, "PING"], capture_output=True, text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.1)
        else:
            raise TimeoutError("redis-server did not answer PING")
        yield RedisServer(port, password, cli, address, tls_dir and tls_dir / "ca.crt")
    finally:
        server.terminate()
        server.wait(timeout=10)


def gcs_fault_tolerance_env(redis: RedisServer, namespace: str) -> tuple[dict[str, str], dict[str, str]]:
    """The head's extra environment (with its ``redis-password`` flag) and the workers', as
    KubeRay derives them from ``gcsFaultToleranceOptions``."""
    head = {"RAY_REDIS_ADDRESS": redis.address, "REDIS_PASSWORD": redis.password,
            "RAY_external_storage_namespace": namespace}
    worker = {"RAY_gcs_rpc_server_reconnect_timeout_s": KUBERAY_WORKER_GCS_RECONNECT_TIMEOUT_S}
    return head, worker


# -- the multi-node cluster ---------------------------------------------------------------------
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
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    haproxy_ports: list[int] = field(default_factory=list)  # serve, stats, metrics
    grpc_port: int = field(default_factory=free_port)  # its HAProxy's gRPC frontend (9000 in every Pod)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def processes(self) -> list[psutil.Process]:
        """Every process of this node, found by its private HAProxy stats port, which is in the
        environment of every process the node's ``ray start`` spawned (GCS, raylet, agents,
        dashboard, workers and actors, HAProxy). The nodes share one Ray temp dir, as a
        session dir is the cluster's, so the temp dir cannot tell them apart."""
        port = self.env["RAY_SERVE_HAPROXY_STATS_PORT"]
        mine = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("RAY_SERVE_HAPROXY_STATS_PORT") == port:
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return mine

    def kill(self) -> int:
        """SIGKILL every process of the node at once (a Pod's containers die with it); their count."""
        victims = self.processes()
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        return len(victims)


@dataclass
class LocalCluster:
    dashboard: str
    token: str
    nodes: list[LocalNode]
    serve_config: dict  # serveConfigV2 as rendered
    deployed: dict  # what was PUT to the dashboard
    store: Path
    temp_dir: Path
    work: Path
    redis: RedisServer | None  # the GCS's, with fault tolerance on
    serving: list[LocalNode] = field(default_factory=list)  # nodes whose ingress is ready

    @property
    def head(self) -> LocalNode:
        return self.nodes[0]

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.dashboard, timeout=30,
                            headers={"Authorization": f"Bearer {self.token}"})

    def start_node(self, node: LocalNode) -> int:
        """``ray start`` as KubeRay's container command runs it, with this node's flags.

        Not ``--block``: the processes outlive the command, and teardown finds them by the
        cluster's temp dir. Its exit status is not trusted either: under load a node can register
        after ``ray start`` gave up waiting (a fixed 30 s), so readiness is read from the cluster
        instead. The role "head" starts a head (again, after a head loss), any other a worker."""
        args = [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats", *(f"--{k}={v}" for k, v in node.flags.items())]
        gcs = f"127.0.0.1:{self.head.flags['port']}"
        args += ["--head"] if node.role == "head" else [f"--address={gcs}"]
        with open(self.work / f"{node.role}.log", "a") as log:
            return subprocess.run(args, env={**os.environ, **node.env}, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=self.work).returncode

    def bring_up(self, node: LocalNode, ready) -> None:
        """Start ``node`` and wait until ``ready()``. On a loaded machine a raylet can give up on
        its agents' start (``ray start`` fails): its processes are killed and it starts again."""
        attempts = 5
        for attempt in range(attempts):
            failed = self.start_node(node) != 0
            last = attempt == attempts - 1
            try:
                wait_for(f"node {node.role}", ready, 20 if failed and not last else READY_TIMEOUT_S)
                return
            except TimeoutError:
                if not failed or last:
                    raise
                node.kill()

    def restart_head(self, head: LocalNode | None = None) -> None:
        """Start the head again after its loss (``head``: the head with other settings). The
        workers' raylets on this machine name the head's GCS address, and ``ray start --head``
        refuses an address a local raylet names while the temp dir's ``ray_current_cluster``
        says it is the running cluster; a restarted head Pod sees neither (its own process
        namespace and file system), so that file goes first."""
        (self.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        self.bring_up(head or self.head, self.head_alive)

    def head_alive(self) -> bool:
        """KubeRay's readiness probes of the head: the GCS's health from its dashboard and the
        raylet's from its dashboard agent (the GCS can be up while the raylet is not)."""
        with self.api() as api:
            gcs = api.get("/api/gcs_healthz").status_code == 200
        raylet = httpx.get(f"http://127.0.0.1:{self.head.agent_port}/api/local_raylet_healthz", timeout=10)
        return gcs and raylet.status_code == 200

    def applications(self) -> dict:
        with self.api() as api:
            return api.get("/api/serve/applications/").json()

    def all_running(self) -> bool:
        """Every Serve application RUNNING (a DEPLOY_FAILED one fails at once)."""
        apps = self.applications()["applications"]
        failed = {n: a["message"] for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
        assert not failed, failed
        return bool(apps) and all(a["status"] == "RUNNING" for a in apps.values())

    def alive_nodes(self) -> list[dict]:
        with self.api() as api:
            nodes = api.get("/api/v0/nodes", params={"limit": 100}).json()["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def node_id(self, node: LocalNode) -> str:
        """The Ray node id of ``node``'s running raylet."""
        for proc in node.processes():
            try:
                if proc.name() == "raylet":
                    return next(a.split("=", 1)[1] for a in proc.cmdline() if a.startswith("--node_id="))
            except (psutil.NoSuchProcess, StopIteration):
                pass
        raise ProcessLookupError(f"no raylet of node {node.role}")

    def haproxy_stats(self, node: LocalNode) -> list[dict[str, str]]:
        """``show stat`` of the node's HAProxy, one dict per proxy and server, from its admin socket.
        Ray nests the socket in a directory named after the node id, under the temp dir."""
        path = next(self.temp_dir.glob(f"n*/hp/{self.node_id(node)}/admin.sock"), None)
        if path is None:
            raise FileNotFoundError(f"no HAProxy admin socket of node {node.role}")
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(path))
            admin.sendall(b"show stat\n")
            data = b""
            while chunk := admin.recv(65536):
                data += chunk
        return list(csv.DictReader(io.StringIO(data.decode().removeprefix("# "))))

    def fallback_up(self, node: LocalNode) -> bool:
        """Whether ``node``'s HAProxy has the current head's fallback proxy UP. Every HTTP backend
        lists it as its backup server, and it is the only server Serve gives HAProxy while an
        application rebuilds after a config change: a head restarts without one, and until Serve
        has started a new one (a Python proxy importing the gRPC servicer) and broadcast it, a
        rebuild leaves the workers' HAProxies nothing to send requests to."""
        head = next((n["node_id"] for n in self.alive_nodes() if n["is_head_node"]), None)
        return any(row["svname"] == f"SERVE_PROXY_ACTOR-fallback-{head}" and row["status"] == "UP"
                   for row in self.haproxy_stats(node) if row["pxname"].startswith("http-"))

    def deploy(self, config: dict) -> None:
        """As the KubeRay operator deploys serveConfigV2 (JSON, to the Serve REST API)."""
        with self.api() as api:
            response = api.put("/api/serve/applications/", json=config)
        assert response.status_code == 200, response.text


def wait_for(what: str, probe, timeout: float = READY_TIMEOUT_S, interval: float = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except (httpx.HTTPError, OSError, ValueError, KeyError):  # a dashboard or a socket still starting
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def healthy(node: LocalNode) -> bool:
    try:
        response = httpx.get(f"{node.url}/-/healthz", timeout=10)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "success" in response.text


@contextmanager
def prod_like_cluster(work: Path, redis: RedisServer | None) -> Iterator[LocalCluster]:
    """The prod overlay's RayCluster started locally, serveConfigV2 deployed and every node's
    ingress ready. ``redis`` is the GCS's Redis, required when the overlay turns on GCS fault
    tolerance (it does)."""
    require_tool("kubectl")
    rayservice = manifests.the_rayservice(manifests.render(manifests.ROOT / "cluster/overlays/prod"))
    cluster_spec = rayservice["spec"]["rayClusterConfig"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert ("gcsFaultToleranceOptions" in cluster_spec) == (redis is not None)

    store = work / "model_store"
    temp_dir = Path(tempfile.mkdtemp(prefix="rayp-", dir="/tmp"))  # short: socket paths < 108 bytes
    token = secrets.token_hex(32)  # what authOptions' Secret gives every Ray container
    gcs_port, dashboard_port = free_port(), free_port()

    head_group = cluster_spec["headGroupSpec"]
    head_flags = {**ray_start_flags(head_group), "port": str(gcs_port), "dashboard-port": str(dashboard_port),
                  "dashboard-host": "127.0.0.1", "ray-client-server-port": str(free_port())}
    nodes = [LocalNode("head", free_port(), free_port(), head_flags, container_env(head_group))]
    for group in cluster_spec["workerGroupSpecs"]:
        for i in range(group["minReplicas"]):
            nodes.append(LocalNode(f"{group['groupName']}-{i}", free_port(), free_port(),
                                   ray_start_flags(group), container_env(group)))
    if redis is not None:
        head_ft, worker_ft = gcs_fault_tolerance_env(redis, str(uuid.uuid4()))
        nodes[0].env.update(head_ft)
        nodes[0].flags["redis-password"] = redis.password
        for node in nodes[1:]:
            node.env.update(worker_ft)
    # Serve's fallback proxy (HAProxy's backup server, on the head; 8500/9500 in a Pod). Every node
    # gets the same ports, as every Pod does: only the head starts a fallback proxy.
    fallback_ports = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                      "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())}
    for index, node in enumerate(nodes):
        node.flags.update({"metrics-export-port": str(free_port()),
                           "dashboard-agent-listen-port": str(node.agent_port),
                           # Every node shares this machine's /dev/shm: keep each object store small.
                           "object-store-memory": str(200 * 2**20)})
        node.haproxy_ports = [node.serve_port, free_port(), free_port()]
        node.env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "SERVE_APP_STORE": str(store),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(node.haproxy_ports[1]),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(node.haproxy_ports[2]),
            **fallback_ports,
            # HAProxy files away from the machine's /tmp/haproxy-serve. Ray nests each node's in a
            # directory named after its node id; in this cluster all of them land under the
            # head's base (n0), the workers' included (haproxy_stats looks them up by node id).
            **haproxy_paths(temp_dir / f"n{index}"),
        })
        if node.role != "head":  # the head's HAProxy binds http_options.port and grpc_options.port
            node.env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(node.serve_port)
            node.env["RAY_SERVE_WORKER_PROXY_GRPC_PORT"] = str(node.grpc_port)

    deployed = copy.deepcopy(serve_config)
    deployed["http_options"]["port"] = nodes[0].serve_port
    deployed["grpc_options"]["port"] = nodes[0].grpc_port
    local = LocalCluster(f"http://127.0.0.1:{dashboard_port}", token, nodes, serve_config, deployed, store,
                         temp_dir, work, redis)
    try:
        local.bring_up(local.head, local.head_alive)
        # One node at a time, as a busy 2-core machine registers them reliably.
        for count, node in enumerate(nodes[1:], start=2):
            local.bring_up(node, lambda: len(local.alive_nodes()) == count)
        local.deploy(deployed)
        wait_for("the Serve applications", local.all_running)

        # KubeRay's readiness: a Pod serves once Serve's /-/healthz on its serve port says so.
        # Serve runs an ingress on the head and on every node that hosts a replica.
        def ingresses_ready() -> bool:
            proxies = local.applications()["proxies"].values()
            local.serving = [n for n in nodes if healthy(n)]
            return (all(p["status"] == "HEALTHY" for p in proxies)
                    and len(local.serving) == len(proxies) and nodes[0] in local.serving)

        wait_for("every node's ingress", ingresses_ready)
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
