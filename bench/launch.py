"""Starting each benchmarked server on free ports, and stopping it without touching anything else.

The machine is shared: every local Ray gets its own ``--temp-dir`` (and is stopped through it,
never with a global ``ray stop``), its own ports, its own HAProxy files; plain processes run in
their own process group and are ended through it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator

import httpx
import yaml

from serve_app.tools.localserve import (FAST_PATH_ENV, ensure_ray_token, free_port, haproxy_paths, stop_orphaned_haproxy, stop_process_group,
                                  stop_ray_cluster, wait_ready)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 300  # a loaded 2-core machine starts Ray and replicas slowly
DRAIN_WAIT_S = 120
RAY_START_ATTEMPTS = 3


def session_processes(session: int) -> list:
    """Every live process of one server: those of the session its launcher started (``ray
    start`` and the daemons it leaves behind, or a uvicorn/MLServer supervisor and its
    workers all share it)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getsid(proc.pid) == session:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def session_memory(session: int) -> dict:
    """Process count and resident memory (RSS, and PSS, which splits shared pages fairly) of
    one server's session."""
    import psutil

    count, rss, pss = 0, 0, 0
    for proc in session_processes(session):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        count, rss, pss = count + 1, rss + info.rss, pss + getattr(info, "pss", info.rss)
    return {"processes": count, "rss_mb": round(rss / 2**20), "pss_mb": round(pss / 2**20)}


def other_raylets(own_temp_dirs) -> int:
    """Raylets on this machine that belong to no cluster of ours (each one a Ray someone else
    runs: a shared machine's tests, a ``make serve``): a cell measured beside one shares the cores."""
    import psutil

    count = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or ())
            if proc.info["name"] == "raylet" and not any(str(d) in line for d in own_temp_dirs):
                count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return count


def wait_for_other_rays(own_temp_dirs, timeout_s: float) -> None:
    """Before starting a Ray: wait (up to ``timeout_s``) until no other Ray runs here."""
    deadline, told = time.monotonic() + timeout_s, False
    while (others := other_raylets(own_temp_dirs)) and time.monotonic() < deadline:
        if not told:
            print(f"  waiting for {others} other Ray(s) on this machine to stop (up to {timeout_s:.0f} s)", flush=True)
            told = True
        time.sleep(5)


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    http_port: int
    env: dict[str, str]
    temp_dir: Path
    session: int = 0  # the session of its processes (session_memory)
    grpc_port: int = 9000

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@contextmanager
def ray_cluster(ha_proxy: bool, work: Path, extra_env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """A local Ray head; ``ha_proxy`` picks the ingress: HAProxy + direct ingress (our fast path)
    or Ray Serve's default Python proxy (what a Serve app gets without configuration);
    ``extra_env`` adds to (or overrides) the environment Ray starts with."""
    ensure_ray_token(BIN / "ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))  # short: socket paths
    gcs, dashboard, metrics, http, grpc_port = (free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    if ha_proxy:
        env.update({**FAST_PATH_ENV, **haproxy_paths(temp_dir),
                    "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())})
    else:
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})
    env.update(extra_env or {})
    log = open(work / f"ray-start-{temp_dir.name}.log", "w")
    try:
        command = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                   f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        for attempt in range(RAY_START_ATTEMPTS):
            # `ray start` gives its raylet a fixed 30 s to register: a busy machine can miss that.
            # A session of its own: stop_ray_cluster finds Ray's orphans (its client server) by
            # process group, and never touches the caller's; session_memory counts it.
            starter = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            if starter.wait() == 0:
                break
            stop_ray_cluster(temp_dir)
        else:
            raise RuntimeError(f"ray start failed {RAY_START_ATTEMPTS} times; see {log.name}")
        yield RayCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", http, env, temp_dir, starter.pid,
                         grpc_port)
    finally:
        stop_ray_cluster(temp_dir)  # this cluster only
        if ha_proxy:
            stop_orphaned_haproxy(http)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.close()


def _serve_api(cluster: RayCluster, method: str) -> httpx.Response:
    """Serve's REST API on the cluster's dashboard (token auth is on)."""
    token = ensure_ray_token(BIN / "ray")
    response = httpx.request(method, f"{cluster.dashboard_url}/api/serve/applications/", timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response


def _applications(cluster: RayCluster) -> dict:
    return _serve_api(cluster, "GET").json().get("applications") or {}


def running_replicas(cluster: RayCluster, app: str, deployment: str) -> int:
    """How many replicas of one deployment are RUNNING now (autoscaling may have added some)."""
    replicas = _applications(cluster)[app]["deployments"][deployment]["replicas"]
    return sum(r["state"] == "RUNNING" for r in replicas)


@contextmanager
def serve_run(cluster: RayCluster, config: dict, log_path: Path) -> Iterator[str]:
    """``serve run`` of a Serve config on ``cluster``; yields the base URL once every
    application of *this* config is RUNNING (all its replicas up), and tears the applications
    down after.

    "This config": an application of the same name from the previous configuration can still
    be RUNNING while it shuts down, so one counts only when it was deployed after this call
    began (``last_deployed_time_s``). Before that check, lever cells measured a draining
    application at 50-700 req/s from the third configuration on."""
    config = {**config, "http_options": {**config.get("http_options", {}), "host": "127.0.0.1",
                                         "port": cluster.http_port},
              "grpc_options": {**config.get("grpc_options", {}), "port": cluster.grpc_port}}
    config_path = log_path.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    names = {app["name"] for app in config["applications"]}
    launched = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", cluster.gcs_address, str(config_path)],
                                env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve run exited with {proc.returncode}; see {log_path}")
                try:
                    apps = _applications(cluster)
                    if names <= set(apps) and all(apps[n]["status"] == "RUNNING"
                                                  and apps[n]["last_deployed_time_s"] >= launched for n in names):
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"applications {sorted(names)} not RUNNING after {READY_TIMEOUT_S} s")
                time.sleep(1)
            yield cluster.url
        finally:
            stop_process_group(proc, timeout=90)
            # Ctrl-C makes serve run shut Serve down, which here times out and leaves the
            # applications running: delete them through the REST API, and wait until they are
            # gone (an ingress replica drains for up to 35 s): a draining replica must not
            # share the next configuration's measurement.
            try:
                _serve_api(cluster, "DELETE")
            except httpx.HTTPError as exc:
                print(f"  deleting the applications failed: {exc}", flush=True)
            deadline = time.monotonic() + DRAIN_WAIT_S
            while True:
                try:
                    if not names & set(_applications(cluster)):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    print(f"  applications {sorted(names)} still shutting down after {DRAIN_WAIT_S} s: "
                          "the next configuration may share the machine with them", flush=True)
                    break
                time.sleep(1)


@dataclass
class ProcessServer:
    url: str
    session: int
    grpc_target: str | None = None  # host:port of its gRPC service, if it has one


@contextmanager
def process_server(command: list[str], env: dict, ready_path: str, port: int, log_path: Path,
                   settle_s: float = 0.0) -> Iterator[ProcessServer]:
    """A server process in a session of its own; yields it once ``ready_path`` answers 200
    (and ``settle_s`` later: a supervisor's other workers may still be starting)."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_ready(url + ready_path, proc, timeout=READY_TIMEOUT_S)
            time.sleep(settle_s)
            yield ProcessServer(url, proc.pid)
        finally:
            stop_process_group(proc, timeout=30)


def fastapi_server(model_dir: Path, log_path: Path, workers: int) -> ContextManager[ProcessServer]:
    """The careful FastAPI app (bench/servers/careful_fastapi.py) under uvicorn with ``workers``
    processes, uvicorn's access log off (as in our shipped config)."""
    port = free_port()
    env = {**os.environ, "BENCH_MODEL_DIR": str(model_dir), "PYTHONPATH": str(ROOT)}
    command = [str(BIN / "uvicorn"), "bench.servers.careful_fastapi:app", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log", "--workers", str(workers)]
    return process_server(command, env, "/ready", port, log_path, settle_s=2.0 if workers > 1 else 0.0)


def mlserver(venv: Path, model_dir: Path, log_path: Path, workers: int) -> ContextManager[ProcessServer]:
    """MLServer from its own virtualenv, serving ``model_dir`` (model folders with their
    model-settings.json, adaptive batching on) with ``workers`` inference processes
    (``parallel_workers``), its other settings at their defaults."""
    port, grpc_port = free_port(), free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_port": free_port(),
                "parallel_workers": workers}
    (model_dir / "settings.json").write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return _with_grpc(process_server([str(venv / "bin" / "mlserver"), "start", str(model_dir)], env,
                                     "/v2/health/ready", port, log_path, settle_s=2.0), f"127.0.0.1:{grpc_port}")


@contextmanager
def _with_grpc(server: ContextManager[ProcessServer], target: str) -> Iterator[ProcessServer]:
    with server as proc:
        proc.grpc_target = target
        yield proc
