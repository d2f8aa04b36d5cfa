"""Stopping a local server leaves nothing behind and touches nothing else (docs/development.md#stopping).

Three start/stop cycles, each on its own free ports: ``make serve`` stopped with Ctrl-C
(SIGINT to its process group, as a terminal sends it) while a second ``make serve`` runs beside
it, that second one stopped with ``make stop``, and the image's CMD (``python -m
serve_app.tools.container``, run here without a container) stopped with SIGTERM. After each,
no process of that run is left (make, the supervisor, every Ray process, HAProxy), nothing
listens on any of its ports and a request fails; the neighbour is untouched and still answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import CONFIG, ROOT
from serve_app.tools.localserve import FAST_PATH_ENV, cluster_processes, free_port, haproxy_paths, stop_cluster
from serve_app.tools.supervisor import Run

pytestmark = [pytest.mark.serve, pytest.mark.slow]

# What a stop may take: the supervisor's SIGTERM-then-SIGKILL grace (1 s) with room for a busy
# machine. Ctrl-C of a bare `serve run` takes ~33 s (Serve's 30 s direct-ingress drain).
STOP_BOUND_S = 10
IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> dict:
    """The shipped config cut to one model on one replica: these tests are about processes."""
    work = tmp_path_factory.mktemp("stop")
    # Every demo model, so that `make serve`'s own training (--if-missing) has nothing to do.
    subprocess.run([sys.executable, "-m", "serve_app.tools.train", "--store", str(work / "store")], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["host"] = "127.0.0.1"
    app = config["applications"][0]
    app["args"].update(store=str(work / "store"), train_if_missing=False, models=[{"name": "iris"}])
    app["args"].pop("multiplexed"), app["args"].pop("invocations_model")
    app["deployments"] = [{"name": "ModelServer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}]
    return config


def ports_and_env(config: dict, work: Path) -> tuple[Path, dict[str, int], dict[str, str]]:
    """A copy of ``config`` on free ports, and the environment moving every other port Ray
    and HAProxy bind off its default (the machine is shared)."""
    ports = {name: free_port() for name in ("http", "grpc", "dashboard", "metrics", "haproxy_stats",
                                             "haproxy_metrics", "fallback_http", "fallback_grpc")}
    config = {**config, "http_options": {**config["http_options"], "port": ports["http"]},
              "grpc_options": {**config["grpc_options"], "port": ports["grpc"]}}
    path = work / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **FAST_PATH_ENV, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "RAY_SERVE_HAPROXY_STATS_PORT": str(ports["haproxy_stats"]),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports["haproxy_metrics"]),
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports["fallback_http"]),
           "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ports["fallback_grpc"])}
    return path, ports, env


def wait_serving(proc: subprocess.Popen, run_file: Path, url: str, timeout: float = 420) -> Run:
    """The run once its supervisor recorded it ready and it answers a prediction."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        run = Run.read(run_file)
        if run is not None and run.pids:
            answer = httpx.post(f"{url}/v1/models/iris:predict", json=IRIS, timeout=30)
            assert answer.status_code == 200, answer.text
            return run
        time.sleep(1)
    raise TimeoutError(f"not serving within {timeout} s")


def listening(ports) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in set(ports)}


def assert_nothing_left(started: list[psutil.Process], ports: dict[str, int], run_file: Path) -> None:
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert not listening(ports.values()), listening(ports.values())
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"http://127.0.0.1:{ports['http']}/v1/models/iris:predict", json=IRIS, timeout=5)
    assert not run_file.exists()


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    # A session of its own, as a terminal's foreground job: Ctrl-C reaches its whole group.
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_processes(proc: subprocess.Popen, run: Run) -> list[psutil.Process]:
    """Every process of the run: the launcher and its descendants (make, the supervisor) and
    every process the run's markers find (Ray's, HAProxy)."""
    launcher = psutil.Process(proc.pid)
    found = {p.pid: p for p in [launcher, *launcher.children(recursive=True), *cluster_processes(run.markers)]}
    assert any("haproxy" in p.name() for p in found.values()), "the HAProxy fast path is not on"
    assert any("raylet" in p.name() for p in found.values())
    recorded = {pid for pid in run.pids if psutil.pid_exists(pid)}  # HAProxy reloads replace theirs
    assert recorded <= set(found), "processes recorded at start are not found by the run's markers"
    return list(found.values())


class Server:
    """One server started for a cycle: its launcher, log, ports, run file, and (once it serves)
    its run and every process of it."""

    def __init__(self, name: str, argv: list[str], env: dict, ports: dict, run_file: Path, work: Path):
        self.name, self.ports, self.run_file, self.log = name, ports, run_file, work / f"{name}.log"
        self.proc = start(argv, env, self.log)
        self.processes: list[psutil.Process] = []

    def wait_serving(self) -> "Server":
        run = wait_serving(self.proc, self.run_file, f"http://127.0.0.1:{self.ports['http']}")
        self.processes = run_processes(self.proc, run)
        return self

    def stop(self, how) -> float:
        """Stop it ``how``; the stop's duration, once nothing of it is left. Ctrl-C reaches make
        too, which then reports the interrupt (its status is not 0); the others exit 0."""
        began = time.monotonic()
        how(self.proc)
        status = self.proc.wait(timeout=60)
        took = time.monotonic() - began
        assert self.name == "ctrl-c" or status == 0, status
        assert_nothing_left(self.processes, self.ports, self.run_file)
        print(f"\n{self.name}: stopped in {took:.1f} s; {len(self.processes)} processes, all gone")
        return took

    def cleanup(self, failed: bool) -> None:
        if failed:
            print(f"--- {self.name}:\n{self.log.read_text()[-4000:]}", file=sys.stderr)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        run = Run.read(self.run_file)
        if run is not None:
            stop_cluster(run.markers)


MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]  # never reinstall the venv mid-test


def make_serve(config: Path, store: str, ports: dict[str, int], run_file: Path) -> list[str]:
    return [*MAKE, "serve", f"CONFIG={config}", f"STORE={store}", f"SERVE_RUN_FILE={run_file}",
            f"SERVE_ARGS=--dashboard-port {ports['dashboard']} --metrics-export-port {ports['metrics']}"]


def test_three_starts_and_stops_leave_nothing_and_touch_nothing_else(small_config, tmp_path):
    """Servers 1 and 2 (both `make serve`) run side by side: stopping 1 with Ctrl-C must leave
    2 whole and serving; 2 then stops with `make stop`, and 3 (the image's CMD) with SIGTERM."""
    store = small_config["applications"][0]["args"]["store"]
    servers, took, failed = [], {}, True
    try:
        for name in ("ctrl-c", "make stop"):
            work = tmp_path / name.replace(" ", "-")
            work.mkdir()
            config, ports, env = ports_and_env(small_config, work)
            run_file = work / "run.json"
            servers.append(Server(name, make_serve(config, store, ports, run_file), env, ports, run_file, work))
            servers[-1].wait_serving()  # one at a time: two Ray starts at once strain 2 cores
        first, second = servers

        took["ctrl-c"] = first.stop(lambda proc: os.killpg(proc.pid, signal.SIGINT))
        assert all(p.is_running() for p in second.processes), "Ctrl-C of one server ended a process of another"
        assert httpx.post(f"http://127.0.0.1:{second.ports['http']}/v1/models/iris:predict", json=IRIS,
                          timeout=30).status_code == 200
        took["make stop"] = second.stop(
            lambda proc: subprocess.run([*MAKE, "stop", f"SERVE_RUN_FILE={second.run_file}"], cwd=ROOT, check=True))

        # The image's CMD, SIGTERM (`docker stop`, the kubelet), after a short drain.
        work = tmp_path / "sigterm"
        work.mkdir()
        config, ports, env = ports_and_env(small_config, work)
        temp_root = Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))  # short: Ray's socket paths
        env.update(SERVE_CONFIG=str(config), RAY_DASHBOARD_PORT=str(ports["dashboard"]),
                   RAY_METRICS_EXPORT_PORT=str(ports["metrics"]), RAY_TMPDIR=str(temp_root), SERVE_DRAIN_S="2",
                   **haproxy_paths(temp_root))
        servers.append(Server("SIGTERM", [sys.executable, "-m", "serve_app.tools.container"], env, ports,
                              temp_root / "serve-app-run.json", work))
        took["SIGTERM"] = servers[-1].wait_serving().stop(lambda proc: os.kill(proc.pid, signal.SIGTERM))
        failed = False
    finally:
        for server in servers:
            server.cleanup(failed)
        if len(servers) == 3:
            shutil.rmtree(temp_root, ignore_errors=True)

    print(f"\nstop times (s): { {k: round(v, 1) for k, v in took.items()} }")
    assert max(took.values()) < STOP_BOUND_S, took
