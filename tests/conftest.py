"""Shared fixtures. The ``serve`` fixture runs the real thing: a local Ray head started with
``ray start`` and the shipped ``configs/serve_config.yaml`` deployed with ``serve run``
(the HAProxy fast path on, as ``make serve`` does), on free ports, with a temporary model
store and test-friendly autoscaling delays. No part of Ray is mocked.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.store import ModelStore
from serve_app.tools.localserve import (FAST_PATH_ENV, ensure_ray_token, free_port, haproxy_paths, stop_orphaned_haproxy, stop_process_group,
                                  stop_ray_cluster, wait_ready)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "serve_config.yaml"
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Token auth stays on (Ray's default); clients find the token in ~/.ray/auth_token. Set at
# import, before any test module imports ray: Ray reads its auth mode once per process.
os.environ["RAY_AUTH_MODE"] = "token"
# `ray start` (the fixtures below, test_parity, test_redis_tls) refuses to start without one.
ensure_ray_token(BIN / "ray")


def require_tool(name: str) -> str:
    """Path of an external tool; a skip on a laptop without it, a failure under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message}, but CI must run this test (.ci/run installs it)")
        pytest.skip(message)
    return path


@dataclass
class ServeCluster:
    url: str
    gcs_address: str
    metrics_url: str
    config: dict
    store: Path
    ray_temp_dir: Path
    api_token: str  # the bearer token of the GUARDED application
    dashboard_url: str
    grpc_target: str  # host:port of the gRPC service (HAProxy's h2 frontend)

    def serve_api(self) -> httpx.Client:
        """Ray's dashboard REST API (Serve's declarative deploy), with Ray's own auth token."""
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        return httpx.Client(base_url=self.dashboard_url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"})  # this cluster's own Ray temp dir: its logs and Prometheus file-SD file

    @property
    def session_dir(self) -> Path:
        return self.ray_temp_dir / "session_latest"

    @property
    def prometheus_sd_file(self) -> Path:
        """The file-SD target list Ray writes for Prometheus (its metrics export ports)."""
        return self.ray_temp_dir / "prom_metrics_service_discovery.json"

    def metric_samples(self, name: str) -> dict[tuple, float]:
        """Current samples of one metric from Ray's metrics export port, by label set."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.metrics_url, timeout=10).text
        samples: dict[tuple, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    key = tuple(sorted(sample.labels.items()))
                    samples[key] = samples.get(key, 0.0) + sample.value
        return samples

    def metric_total(self, name: str, **labels: str) -> float:
        return sum(
            value for key, value in self.metric_samples(name).items()
            if all(dict(key).get(k) == v for k, v in labels.items())
        )


@dataclass
class Outcome:
    at: float           # time.monotonic() when the answer (or the error) came
    status: int         # 0 when the request failed without an HTTP answer
    body: dict | None   # the JSON answer, when there was one

    @property
    def ok(self) -> bool:
        return self.status == 200


class SteadyLoad:
    """``clients`` threads sending the same POST in a loop until the ``with`` block ends: the
    load under which the reliability tests kill replicas and nodes or redeploy. ``outcomes``
    grows as answers come."""

    def __init__(self, url: str, path: str, body: dict, headers: dict | None = None, clients: int = 4):
        self.url, self.path, self.body, self.headers, self.clients = url, path, body, headers or {}, clients
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.path, json=self.body)
                    body = response.json() if response.headers.get("content-type", "").startswith(
                        "application/json") else None
                    self.outcomes.append(Outcome(time.monotonic(), response.status_code, body))
                except httpx.HTTPError:
                    self.outcomes.append(Outcome(time.monotonic(), 0, None))

    def __enter__(self) -> "SteadyLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def since(self, at: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.at >= at]


def make_test_config(store: Path, port: int, api_token: str, grpc_port: int | None = None) -> dict:
    """The shipped config, with a private store/ports and delays short enough for tests."""
    config = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    config["http_options"]["port"] = port
    config["grpc_options"]["port"] = grpc_port or free_port()
    app = config["applications"][0]
    app["args"]["store"] = str(store)
    # One more in-process model that only the batching test calls, so its metrics are exact,
    # with a wait long enough that concurrent requests visibly share a batch.
    app["args"]["models"].append(
        {"name": "wine", "version": "latest", "max_batch_size": 32, "batch_wait_timeout_s": 0.05})
    # No sampled access lines: the logging test checks that an ordinary request leaves none.
    app["args"]["access_log"]["sample_rate"] = 0
    # The dedicated model scales fast so the autoscaling test sees up- and downscaling.
    # Drift windows small and fast enough for the drift test to fill and see them.
    for model in app["args"]["models"]:
        if model["name"] == "breast-cancer":
            model["drift"] = {"window_rows": 300, "min_rows": 100, "interval_s": 1}
    # Two ingress replicas throughout (no downscaling mid-suite): the replica-kill test needs
    # a survivor, and deployment status stays HEALTHY for the metric assertions.
    ingress = next(d for d in app["deployments"] if d["name"] == "ModelServer")
    ingress["autoscaling_config"].update(min_replicas=2, initial_replicas=2)
    diabetes = next(d for d in app["deployments"] if d["name"] == "model-diabetes")
    diabetes["autoscaling_config"].update(
        min_replicas=1, max_replicas=2, target_ongoing_requests=2,
        upscale_delay_s=1, downscale_delay_s=3)
    # The guarded application has a store of its own: versions added there by the tests never
    # change what "latest" means for the main application.
    config["applications"].append(guarded_app(store.parent / "guarded_store", api_token))
    config["applications"].append(fleet_app(store.parent / "fleet_store"))
    return config


FLEET = "/fleet"
TAIL_MODELS = [f"tail-{i:02d}" for i in range(20)]
FLEET_MAX_MODELS_PER_REPLICA = 4
# Above the large models of tests/test_resource_bounds.py (25 MB), below its too-large one (50 MB).
FLEET_MAX_MODEL_BYTES = 40 * 2**20


def fleet_app(store: Path) -> dict:
    """A third application for versions and the long tail (tests/test_versions.py): iris with
    three live versions (80/20 canary between 1 and 2, version 3 in shadow), diabetes on
    "latest" (the reload test trains a new version), and every other stored model multiplexed
    on one replica holding at most FLEET_MAX_MODELS_PER_REPLICA models, none over
    FLEET_MAX_MODEL_BYTES. Its store is filled before the cluster starts (prepare_fleet_store)."""
    return {
        "name": "fleet", "route_prefix": FLEET, "import_path": "serve_app.app:build_app",
        "args": {"store": str(store), "train_if_missing": False, "access_log": {"sample_rate": 0},
                 "max_model_bytes": FLEET_MAX_MODEL_BYTES,
                 "models": [
                     {"name": "iris", "version": "1", "traffic": {"1": 80, "2": 20}, "shadow": "3",
                      "drift": {"window_rows": 0}},
                     {"name": "diabetes", "drift": {"window_rows": 0}},
                 ],
                 "multiplexed": {"models": ["*"], "max_models_per_replica": FLEET_MAX_MODELS_PER_REPLICA}},
        "deployments": [
            {"name": "ModelServer", "num_replicas": 1, "max_ongoing_requests": 64,
             "ray_actor_options": {"num_cpus": 0.25}},
            {"name": "multiplexed-models", "num_replicas": 1, "max_ongoing_requests": 64,
             "ray_actor_options": {"num_cpus": 0.25}},
        ],
    }


def prepare_fleet_store(path: Path) -> None:
    """iris 1-3 (version 3 is much more regularised: it disagrees with 1 on some rows) and
    diabetes 1, and twenty small iris variants for the long tail, each with its own C."""
    from serve_app.tools.train import train_model

    store = ModelStore(str(path))
    train_model("iris", store, version="1")
    train_model("iris", store, version="2", C=0.5)
    train_model("iris", store, version="3", C=0.001)
    train_model("diabetes", store, version="1")
    for i, name in enumerate(TAIL_MODELS):
        train_model("iris", store, version="1", save_as=name, C=0.001 * 2 ** i)


GUARDED = "/guarded"


def guarded_app(store: Path, api_token: str) -> dict:
    """A second application (the same code, its own replica) with the data-plane token set and
    a model that cannot meet its timeout: single rows wait 1 s for a batch to fill, the model
    allows 0.3 s. The reliability tests use it; the main application stays open and fast."""
    return {
        "name": "guarded", "route_prefix": GUARDED, "import_path": "serve_app.app:build_app",
        "runtime_env": {"env_vars": {"SERVE_APP_API_TOKEN": api_token}},
        "args": {"store": str(store), "models": [
            {"name": "iris"},
            {"name": "breast-cancer", "max_batch_size": 64, "batch_wait_timeout_s": 1.0, "timeout_s": 0.3},
        ]},
        "deployments": [{"name": "ModelServer", "num_replicas": 1, "max_ongoing_requests": 64,
                         "ray_actor_options": {"num_cpus": 0.25}}],
    }


@pytest.fixture(scope="session")
def serve_cluster(tmp_path_factory) -> ServeCluster:
    work = tmp_path_factory.mktemp("serve")
    # A private Ray temp dir (short: Ray's socket paths must stay under 107 bytes), so this
    # cluster's file-SD file and logs are its own even beside another local Ray.
    ray_temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    store = work / "model_store"
    (http_port, gcs_port, dash_port, metrics_port, haproxy_stats, haproxy_metrics,
     fallback_http, fallback_grpc, grpc_port, agent_port) = (free_port() for _ in range(10))
    api_token = secrets.token_urlsafe(24)
    config = make_test_config(store, http_port, api_token, grpc_port)
    prepare_fleet_store(work / "fleet_store")
    config_path = work / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **FAST_PATH_ENV, "RAY_metrics_report_interval_ms": "1000",
           # HAProxy's own ports too, so the suite runs beside a `make serve`.
           "RAY_SERVE_HAPROXY_STATS_PORT": str(haproxy_stats),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(haproxy_metrics),
           # HAProxy's config, admin socket and server state default to /tmp/haproxy-serve,
           # shared by every local Ray: this cluster's go under its own temp dir.
           **haproxy_paths(ray_temp),
           # ...and Serve's fallback proxy behind HAProxy (default 8500/9500).
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
           "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    gcs = f"127.0.0.1:{gcs_port}"
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=4",
         f"--dashboard-port={dash_port}", f"--metrics-export-port={metrics_port}", f"--temp-dir={ray_temp}",
         # the dashboard agent's port too (default 52365): beside another local Ray, a taken one
         # makes the raylet give up waiting for its agent
         f"--dashboard-agent-listen-port={agent_port}",
         "--disable-usage-stats"],
        check=True, env=env, cwd=work, stdout=subprocess.DEVNULL,
    )
    log = open(work / "serve_run.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", "--address", gcs, str(config_path)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(f"{url}/v1/models", proc)
        import ray

        ray.init(address=gcs, namespace="serve", log_to_driver=False)
        wait_ready(f"{url}{GUARDED}/v2/health/ready", proc)
        wait_ready(f"{url}{FLEET}/v2/health/ready", proc)
        yield ServeCluster(url, gcs, f"http://127.0.0.1:{metrics_port}/metrics", config, store, ray_temp, api_token,
                           f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{grpc_port}")
    except BaseException:
        log.flush()
        print((work / "serve_run.log").read_text()[-5000:], file=sys.stderr)
        raise
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_process_group(proc)
        stop_ray_cluster(ray_temp)  # only this cluster: never a `make serve` running beside it
        stop_orphaned_haproxy(http_port)
        log.close()
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_url(serve_cluster) -> str:
    return serve_cluster.url


@pytest.fixture()
def http(serve_url):
    with httpx.Client(base_url=serve_url, timeout=30) as client:
        yield client


# -- S3 (a real moto server on loopback) --------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer  # here: only S3 tests need moto

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server, with the environment pointing boto3 at it."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    import boto3  # here: only S3 tests need boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    return client, bucket
