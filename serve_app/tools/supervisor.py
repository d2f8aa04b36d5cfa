"""One local Ray Serve started and stopped as a unit: ``serve-app serve`` (``make serve``, the
image's CMD) and ``serve-app stop`` (``make stop``).

``serve run`` is not enough on its own: on Ctrl-C it deletes every application through Serve's
graceful shutdown and then waits for Ray's processes (~33 s, docs/development.md#stopping),
and Ray 2.60's HAProxy, a child of the proxy actor, can outlive it and keep the HTTP port. The
only broad clean-ups (``ray stop``, a pkill by name) also end other checkouts', notebooks' and
tests' clusters. So this starts Ray with a temp dir of its own and the HAProxy files under it,
deploys the config as ``serve run`` does, records what it started in a run file, and on SIGINT
or SIGTERM ends exactly that: every process naming Ray's session dir (or this node's HAProxy
config dir) on its command line, and their children. Requests in flight at that moment are dropped, unless
``drain_s`` first gives Serve that long to shut the applications down gracefully (the image).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

try:  # not Ray at import: `serve-app stop` must start fast
    import psutil
except ImportError:  # the image: Ray ships its own psutil (ray/thirdparty_files), on the path once ray is imported
    import ray
    import psutil

from serve_app.tools.localserve import cluster_processes, haproxy_paths, stop_cluster

RUN_FILE = Path(".serve-app/run.json")
# How long processes get after SIGTERM before SIGKILL: nothing of a run outlives it (its temp
# dir goes with it), so a short grace, and a stop in seconds.
STOP_TIMEOUT_S = 1.0
SD_FILE = "prom_metrics_service_discovery.json"
RAY_START_ATTEMPTS = 3


@dataclass
class Run:
    """What one supervisor started: enough for ``serve-app stop`` (another process) to stop it."""

    pid: int
    started_at: float  # the supervisor's process create time: tells a reused pid apart
    temp_dir: str
    private: bool  # the temp dir was made for this run (removed with it)
    markers: list[str]  # a process naming one of these on its command line belongs to this run
    url: str
    ports: dict[str, int]
    pids: list[int] = field(default_factory=list)  # the run's processes once it served

    @classmethod
    def read(cls, path: Path) -> "Run | None":
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    def supervisor_alive(self) -> bool:
        try:
            return psutil.Process(self.pid).create_time() == self.started_at
        except psutil.NoSuchProcess:
            return False


def stop_run(run: Run, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop ``run`` from any process: SIGTERM to its supervisor, which stops its cluster; then
    end whatever of the run is still there (a supervisor killed with SIGKILL left it all)."""
    if run.supervisor_alive():
        supervisor = psutil.Process(run.pid)
        supervisor.terminate()
        psutil.wait_procs([supervisor], timeout=timeout + 5)
    stop_cluster(run.markers, timeout=timeout)
    if run.private:
        shutil.rmtree(run.temp_dir, ignore_errors=True)


@dataclass
class Options:
    config: str
    run_file: Path = RUN_FILE
    temp_dir: str | None = None  # None: a fresh private one under /tmp, removed at stop
    node_ip: str | None = "127.0.0.1"
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    metrics_export_port: int | None = None  # None: Ray picks one
    drain_s: float = 0.0  # time Serve gets to shut the applications down before Ray is stopped
    ready_timeout_s: float = 300.0


class _Stop(BaseException):
    """Raised by the signal handler wherever the main thread is (start-up included)."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def serve_forever(opts: Options) -> int:
    """Start Ray and the config's applications, write the run file, serve until SIGINT or
    SIGTERM, then stop exactly what was started and exit with the status."""
    previous = Run.read(opts.run_file)
    if previous is not None:
        if previous.supervisor_alive():
            print(f"already serving on {previous.url} (pid {previous.pid}, run file {opts.run_file}); "
                  "stop it first: make stop", file=sys.stderr)
            return 1
        stop_run(previous)  # its supervisor died without stopping it: leftovers, if any
        opts.run_file.unlink(missing_ok=True)
    import ray  # here: only serving needs Ray (see the imports above)
    from ray.serve.scripts import cli as serve_cli  # here: as ray

    private = opts.temp_dir is None
    # Short: Ray's socket paths must stay under 107 bytes, HAProxy's admin socket under 97.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp") if private else opts.temp_dir
    if private:  # else Ray's defaults (/tmp/haproxy-serve), as in the image
        for key, value in haproxy_paths(Path(temp_dir)).items():
            os.environ.setdefault(key, value)
    # Until Ray names its session, a private temp dir marks this run's processes.
    markers = [temp_dir] if private else []
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    run = None
    launched = time.time()
    sd_link = opts.run_file.parent / SD_FILE
    try:
        settings = yaml.safe_load(Path(opts.config).read_text())
        ports = {"http": settings.get("http_options", {}).get("port", 8000),
                 "grpc": settings.get("grpc_options", {}).get("port", 9000),
                 "dashboard": opts.dashboard_port}
        _start_ray(opts, temp_dir, launched)
        signal.signal(signal.SIGTERM, _raise_stop)  # ray.init installs its own
        # Every process of the cluster names its session dir; HAProxy names its config's dir.
        session = os.path.realpath(Path(temp_dir) / "session_latest")
        haproxy_config = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg")
        markers = [session, str(Path(haproxy_config).parent / ray.get_runtime_context().get_node_id())]
        run = Run(os.getpid(), psutil.Process().create_time(), temp_dir, private, markers,
                  f"http://127.0.0.1:{ports['http']}", ports)
        run.write(opts.run_file)
        if private:  # Ray's metrics ports for Prometheus' file SD at a path that stays put (make monitor)
            sd_link.unlink(missing_ok=True)
            sd_link.symlink_to(Path(temp_dir) / SD_FILE)
        # `serve run` itself (Serve's own reading of the config), returning once it is submitted.
        serve_cli.main(["run", "--non-blocking", opts.config], prog_name="serve", standalone_mode=False)
        _wait_running(opts.ready_timeout_s)
        run.pids = sorted(p.pid for p in cluster_processes(markers))
        run.write(opts.run_file)
        print(f"serving on {run.url} (gRPC 127.0.0.1:{ports['grpc']}, dashboard "
              f"http://127.0.0.1:{ports['dashboard']}); Ray's logs: {session}/logs; "
              f"stop with Ctrl-C or `make stop`", flush=True)
        while True:
            time.sleep(3600)
    except _Stop as why:
        print(f"{why}: stopping", flush=True)
        status = 0
    except (Exception, SystemExit):  # a failed start (`serve run` exits): clean up all the same
        print("serve-app serve: the start failed:", file=sys.stderr)
        traceback.print_exc()  # the whole cause (an OSError's repr drops the path it names)
        sys.stderr.flush()
        status = 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = time.monotonic()
    if not markers:  # a failed start in a shared temp dir: the session it began, if any
        markers = _session_since(temp_dir, launched)
    if opts.drain_s > 0 and ray.is_initialized():
        _drain(opts.drain_s)
    stop_cluster(markers, timeout=STOP_TIMEOUT_S)
    if run is not None and Run.read(opts.run_file) == run:
        opts.run_file.unlink(missing_ok=True)
        sd_link.unlink(missing_ok=True)
    if private:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"stopped in {time.monotonic() - started:.1f} s", flush=True)
    sys.stderr.flush()
    # Not ray.shutdown() or the interpreter's exit: both wait on the cluster just ended.
    os._exit(status)


def _session_since(temp_dir: str, since: float) -> list[str]:
    """The session dir Ray began in ``temp_dir`` after ``since``, as a marker (none: [])."""
    session = Path(temp_dir) / "session_latest"
    return [os.path.realpath(session)] if session.exists() and session.stat().st_mtime >= since else []


def _start_ray(opts: Options, temp_dir: str, launched: float) -> None:
    """A new local Ray of our own ("local": whatever RAY_ADDRESS says). Ray gives its raylet a
    fixed 30 s to register, which a loaded machine can miss: the half-started node is ended and
    started again, as bench/launch.py does with `ray start`."""
    import ray  # here: only serving needs Ray
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        began = time.time()
        try:
            ray.init("local", namespace="serve", _temp_dir=temp_dir, _node_ip_address=opts.node_ip,
                     include_dashboard=True, dashboard_host=opts.dashboard_host,
                     dashboard_port=opts.dashboard_port, _metrics_export_port=opts.metrics_export_port)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"Ray did not start ({exc}); attempt {attempt + 1} of {RAY_START_ATTEMPTS}", file=sys.stderr)
            stop_cluster(_session_since(temp_dir, max(began, launched)), timeout=STOP_TIMEOUT_S)


def _wait_running(timeout: float) -> None:
    """Until every application of the config runs; a failed deployment is an error."""
    from ray import serve  # here: only serving needs Ray
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {name: app.status for name, app in apps.items()}
        failed = {name: app.message for name, app in apps.items() if app.status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        if apps and all(state == "RUNNING" for state in states.values()):
            return
        time.sleep(1)
    raise TimeoutError(f"the applications did not run within {timeout:.0f} s")


def _drain(seconds: float) -> None:
    """Serve's graceful shutdown of the applications, for at most ``seconds``."""
    from ray import serve  # here: only serving needs Ray
    worker = threading.Thread(target=serve.shutdown, daemon=True)
    worker.start()
    worker.join(seconds)


def stop(run_file: Path = RUN_FILE) -> int:
    """``serve-app stop``: stop the server ``run_file`` records, and nothing else."""
    run = Run.read(run_file)
    if run is None:
        print(f"nothing to stop: no {run_file}")
        return 0
    started = time.monotonic()
    stop_run(run)
    run_file.unlink(missing_ok=True)
    print(f"stopped the server of {run_file} (pid {run.pid}, {run.url}) in {time.monotonic() - started:.1f} s")
    return 0
