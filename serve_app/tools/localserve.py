"""Running ``serve run`` as a child process and cleaning up after it.

Shared by the live test fixture and the benchmarks, which both start a real local Serve,
wait for it, and must leave nothing behind for the next run.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time

from pathlib import Path

# Predictions are idempotent, so HAProxy may resend a request whose replica closed the
# connection without answering (a replica killed or crashing mid-request), not only one that
# could not connect (Ray's default, conn-failure). Kept in step with the Makefile.
HAPROXY_RETRY_ON = "conn-failure empty-response"
# The fast path as `make serve`, the image and the RayService run it (tests hold the Makefile,
# the Dockerfile and cluster/base/rayservice.yaml to these values). HAProxy's per-request log
# datagram, parsed by Ray's HAProxyManager for Serve's HTTP metrics, cost ~100 µs of CPU per
# request here; the app's own request counter and latency histogram cover the model routes
# (docs/performance.md#levers, docs/monitoring.md).
FAST_PATH_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
                 "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}


RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def ensure_ray_token(ray_bin: str | os.PathLike) -> str:
    """The token of Ray's token authentication (on by default), generated on a machine that has
    none yet: ``ray start`` refuses to start without one (``serve run`` and ``ray.init`` create
    it themselves). Clients send it as a bearer token to the dashboard and Serve's REST API."""
    if not RAY_TOKEN_FILE.exists():
        subprocess.run([str(ray_bin), "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL)
    return RAY_TOKEN_FILE.read_text().strip()


# Ports for local servers come from below the kernel's ephemeral range (32768-60999 by
# default), where the kernel never hands out a port to someone else's outgoing connection or
# bind(0), and above Ray's worker port range (10002-19999): a port picked with bind(0) is in
# the ephemeral range, and one of Ray's many processes may take it before HAProxy binds it.
LOCAL_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on every interface now, never handed out before by this process."""
    for port in random.sample(LOCAL_PORTS, 200):
        if port in _handed_out:
            continue
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {LOCAL_PORTS}")


def haproxy_paths(base: Path) -> dict[str, str]:
    """Environment that gives one local Ray's HAProxy files of its own under ``base``
    (they default to /tmp/haproxy-serve, shared by every local Ray).

    Names are short: Ray nests a 56-character node id under these paths, and HAProxy refuses
    an admin socket path over 97 bytes (keep ``base`` under ~28 bytes)."""
    (base / "hp").mkdir(parents=True, exist_ok=True)
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "hp" / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "hp" / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base / "hp"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "hp" / "server-state")}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Return once ``url`` answers 200; fail early if the server process died."""
    import httpx  # here: the image's CMD imports this module (the supervisor) and has no httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Serve did not become ready at {url} within {timeout}s")


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Ctrl-C the process group (``serve run`` tears its apps down), then kill it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def stop_orphaned_haproxy(port: int) -> None:
    """Ray 2.60 can leave its HAProxy running after `ray stop`; end the one on ``port``."""
    import psutil  # the test extra's: only the tests and the benchmarks call this

    for proc in psutil.process_iter(["name"]):
        try:
            if "haproxy" in (proc.info["name"] or "") and any(
                    c.laddr and c.laddr.port == port for c in proc.net_connections("tcp")):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def cluster_processes(markers: list[str] | tuple[str, ...]) -> list:
    """The processes of one local Ray cluster: each names one of ``markers`` (its temp dir,
    its HAProxy config directory) on its command line, or descends from one that does.

    Every process of a Ray cluster (GCS, raylet, dashboard, workers) names its session
    directory, which lies under the cluster's temp dir, on its command line, or is a child of
    one that does (workers rename themselves ``ray::...``; HAProxy is a child of the proxy
    actor). A process whose parent died first (Ray's client server, a HAProxy whose actor was
    killed) is found by its own marker or as an orphan in the process group of a matched one.
    Never the caller, its ancestors, or a process of the caller's own group that is not
    matched (its shell, make, a CI runner).
    """
    import psutil  # here: Ray ships it (importable once ray is), the test extra installs it

    # A marker is matched as a substring of every command line: an empty or short one (a
    # lookup that found nothing) would name every process on the machine. No markers: nothing.
    if any(len(str(m).strip()) < 8 for m in markers):
        raise ValueError(f"refusing to look for a cluster's processes by markers {markers!r}: name its temp dir")
    if not markers:
        return []
    mine: dict[int, psutil.Process] = {}
    groups = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(m in arg for arg in proc.info["cmdline"] or () for m in markers):
                groups.add(os.getpgid(proc.pid))
                mine[proc.pid] = proc
                mine.update((child.pid, child) for child in proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            pass
    groups.discard(os.getpgrp())  # never the caller's own group (its shell, make, CI runner)
    for proc in psutil.process_iter():
        try:  # orphans only: a live parent (a shell, a notebook kernel) in that group is not Ray's
            if proc.pid not in mine and proc.ppid() == 1 and os.getpgid(proc.pid) in groups:
                mine[proc.pid] = proc
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    mine.pop(os.getpid(), None)
    for ancestor in psutil.Process().parents():  # whatever matched, never the caller's ancestors
        mine.pop(ancestor.pid, None)
    return list(mine.values())


def stop_cluster(markers: list[str] | tuple[str, ...], timeout: float = 15) -> None:
    """SIGTERM every process of ``cluster_processes(markers)`` at once, SIGKILL those alive
    after ``timeout``; then once more for any process one of them started meanwhile."""
    import psutil  # here: Ray ships it (importable once ray is), the test extra installs it

    for _ in range(2):
        procs = cluster_processes(markers)
        if not procs:
            return
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def stop_ray_cluster(temp_dir: str | os.PathLike, timeout: float = 15) -> None:
    """Stop the local Ray started with ``--temp-dir=temp_dir``, and nothing else.

    ``ray stop`` ends every Ray on the machine; a test or benchmark must not take down a
    ``make serve`` (or another suite) running beside it."""
    stop_cluster([str(temp_dir)], timeout)
