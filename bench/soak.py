"""Soak test: steady load for a long time, sampled over time: errors, p99 latency, resident
memory and open file descriptors of every Serve replica and of HAProxy.

    make soak                          # 10 minutes on a fresh local server (the supervisor of make serve)
    make soak SOAK_SECONDS=90
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --run-file .serve-app/run.json --duration 600

Load: ``concurrency`` threads, each sending single-row predictions in turn to every model of
the shipped config (V1 and V2 alternating). Every ``sample_s`` seconds: the interval's requests,
errors and p99 latency, and each replica's and HAProxy's RSS and open fds (psutil), of the one
cluster the run's markers name (other local Ray clusters are ignored). Results:
bench/results/soak.json (summary and every sample) and soak.png (p99, RSS and fds over time).

Goals (docs/reliability-security.md#guarantees), measured from the first sample after the
warm-up to the last, for the processes that lived through the whole run:
- 0 errors;
- RSS growth < 10 % for every replica and for HAProxy;
- fds flat: no process ends with more than FD_SLACK open fds above its count after the warm-up
  (a leak of one fd per request or per connection would add thousands).
With ``--start`` the server is started with ``serve-app serve`` on free ports and stopped
exactly as ``make stop`` stops it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml

from serve_app.tools.localserve import FAST_PATH_ENV, cluster_processes, free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
RSS_GROWTH_GOAL = 0.10
FD_SLACK = 16

# One valid row per demo model, in feature order.
ROWS = {
    "iris": [5.1, 3.5, 1.4, 0.2],
    "breast-cancer": [17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
                      1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003,
                      0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189],
    "diabetes": [0.038, 0.050, 0.061, 0.021, -0.044, -0.034, -0.043, -0.002, 0.019, -0.017],
}


def watched_processes(markers: list[str]) -> dict[int, tuple[str, psutil.Process]]:
    """The Serve replicas and HAProxy processes of the cluster ``markers`` name, by pid, each
    with a label (the replica's actor name, or "haproxy")."""
    found = {}
    for proc in cluster_processes(markers):
        try:
            if "haproxy" in proc.name():
                found[proc.pid] = ("haproxy", proc)
            # A replica's title names the method it runs now (".check_health"): not part of the label.
            elif replica := re.search(r"ServeReplica:[^.\s]+", " ".join(proc.cmdline())):
                found[proc.pid] = (replica.group(), proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds by what they are (socket, pipe, eventfd, epoll, file...): a rise says which kind."""
    kinds: dict[str, int] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return kinds
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kind = target if kind == "anon_inode" else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def measure(processes: dict[int, tuple[str, psutil.Process]]) -> dict[str, dict]:
    """RSS (bytes) and open fds of each process (in all and by kind), keyed "<label> <pid>"."""
    out = {}
    for pid, (label, proc) in processes.items():
        try:
            kinds = fd_kinds(pid)
            out[f"{label} {pid}"] = {"rss": proc.memory_info().rss, "fds": sum(kinds.values()), "fd_kinds": kinds}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def p99(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def run_soak(url: str, markers: list[str], duration_s: float, concurrency: int = 8, warmup_s: float = 10.0,
             sample_s: float = 5.0, models: tuple[str, ...] = tuple(ROWS)) -> dict:
    """Load ``url`` for ``duration_s``; the summary (``summarize``) and every sample."""
    lock = threading.Lock()
    stop = threading.Event()
    interval = {"latencies": [], "errors": 0}
    error_samples: list[str] = []

    def client_loop(worker: int) -> None:
        requests = itertools.cycle([(m, p) for m in models for p in ("v1", "v2")])
        with httpx.Client(base_url=url, timeout=30) as client:
            for model, protocol in itertools.islice(requests, worker, None):
                if stop.is_set():
                    return
                row = ROWS[model]
                began = time.perf_counter()
                try:
                    if protocol == "v1":
                        response = client.post(f"/v1/models/{model}:predict", json={"instances": [row]})
                    else:
                        response = client.post(f"/v2/models/{model}/infer", json={"inputs": [
                            {"name": "x", "shape": [1, len(row)], "datatype": "FP64", "data": row}]})
                    ok, why = response.status_code == 200, f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                took = time.perf_counter() - began
                with lock:
                    interval["latencies"].append(took)
                    if not ok:
                        interval["errors"] += 1
                        if len(error_samples) < 20:
                            error_samples.append(f"{model} {protocol}: {why}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    next_at = started + sample_s
    while True:
        time.sleep(max(next_at - time.monotonic(), 0))
        with lock:
            latencies, errors = interval["latencies"], interval["errors"]
            interval.update(latencies=[], errors=0)
        at = time.monotonic() - started
        q = p99(latencies)
        samples.append({"t": round(at, 1), "requests": len(latencies), "errors": errors,
                        "p99_ms": round(q * 1000, 2) if q is not None else None,
                        "processes": measure(watched_processes(markers))})
        if at >= duration_s:
            break
        next_at += sample_s
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {**summarize(samples, warmup_s, concurrency, models), "error_samples": error_samples, "samples": samples}


def fd_change(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) != before.get(k, 0)}


def summarize(samples: list[dict], warmup_s: float, concurrency: int, models) -> dict:
    """Totals and, per process alive from the first sample after the warm-up to the last, its
    RSS growth and fd change; the goals' verdicts."""
    steady = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    first, last = steady[0]["processes"], samples[-1]["processes"]
    processes = {}
    for key in sorted(set(first) & set(last)):
        rss0, rss1, fd0, fd1 = first[key]["rss"], last[key]["rss"], first[key]["fds"], last[key]["fds"]
        processes[key] = {"rss_after_warmup_mb": round(rss0 / 2**20, 1), "rss_end_mb": round(rss1 / 2**20, 1),
                          "rss_growth": round(rss1 / rss0 - 1, 4), "fds_after_warmup": fd0, "fds_end": fd1,
                          "fds_max": max(s["processes"].get(key, {}).get("fds", 0) for s in steady),
                          "fds_mid": steady[len(steady) // 2]["processes"].get(key, {}).get("fds", fd0),
                          "fd_kinds_change": fd_change(first[key].get("fd_kinds", {}), last[key].get("fd_kinds", {}))}
    requests = sum(s["requests"] for s in samples)
    errors = sum(s["errors"] for s in samples)
    steady_time = steady[-1]["t"] - steady[0]["t"] if len(steady) > 1 else 0
    replicas = [k for k in processes if not k.startswith("haproxy")]
    haproxy = [k for k in processes if k.startswith("haproxy")]
    growth = max((p["rss_growth"] for p in processes.values()), default=None)
    fd_rise = max((p["fds_end"] - p["fds_after_warmup"] for p in processes.values()), default=None)
    p99s = [s["p99_ms"] for s in steady if s["p99_ms"] is not None]
    goals = {"no_errors": errors == 0,
             "rss_growth_below_10pct": bool(replicas) and bool(haproxy) and growth < RSS_GROWTH_GOAL,
             f"fds_flat_within_{FD_SLACK}": bool(processes) and fd_rise <= FD_SLACK}
    return {
        "duration_s": samples[-1]["t"], "warmup_s": warmup_s, "concurrency": concurrency, "models": list(models),
        "requests": requests, "errors": errors,
        "requests_per_s": round(sum(s["requests"] for s in steady[1:]) / steady_time, 1) if steady_time else None,
        "p99_ms_first": p99s[0] if p99s else None, "p99_ms_last": p99s[-1] if p99s else None,
        "p99_ms_max": max(p99s) if p99s else None,
        "replicas_measured": len(replicas), "haproxy_measured": len(haproxy),
        "max_rss_growth": growth, "max_fd_rise": fd_rise, "processes": processes,
        "goals": goals, "passed": all(goals.values()),
    }


def plot(result: dict, path: Path) -> None:
    """p99, RSS and open fds over time, one line per process."""
    import matplotlib  # the bench extra's; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    samples = result["samples"]
    fig, (ax_p99, ax_rss, ax_fds) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax_p99.plot([s["t"] for s in samples], [s["p99_ms"] for s in samples], marker=".")
    ax_p99.set_ylabel("p99 latency (ms)")
    for key in sorted({k for s in samples for k in s["processes"]}):
        t = [s["t"] for s in samples if key in s["processes"]]
        ax_rss.plot(t, [s["processes"][key]["rss"] / 2**20 for s in samples if key in s["processes"]], label=key)
        ax_fds.plot(t, [s["processes"][key]["fds"] for s in samples if key in s["processes"]], label=key)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_fds.set_ylabel("open fds")
    ax_fds.set_xlabel("seconds")
    ax_rss.legend(fontsize=7)
    for ax in (ax_p99, ax_rss, ax_fds):
        ax.axvline(result["warmup_s"], color="grey", linestyle=":")
        ax.grid(alpha=0.3)
    fig.suptitle(f"soak: {result['requests']:,} requests, {result['errors']} errors, "
                 f"concurrency {result['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def start_server(work: Path) -> tuple[subprocess.Popen, Path]:
    """``serve-app serve`` of the shipped config on free ports; its process and run file."""
    from serve_app.tools.supervisor import Run  # here: Ray, only when this starts a server

    config = yaml.safe_load((ROOT / "configs" / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=free_port())
    config["grpc_options"]["port"] = free_port()
    (work / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **FAST_PATH_ENV, **{key: str(free_port()) for key in (
        "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}}
    run_file = work / "run.json"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve-app"), "serve", "--config", str(work / "serve_config.yaml"),
         "--run-file", str(run_file), "--dashboard-port", str(free_port())],
        cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((run := Run.read(run_file)) and run.pids):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start (exit status {proc.poll()})")
        time.sleep(1)
    return proc, run_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--run-file", type=Path, default=Path(".serve-app/run.json"),
                        help="the run file of the server under test (make serve's by default)")
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=30)
    parser.add_argument("--sample", type=float, default=5, help="seconds between samples")
    parser.add_argument("--start", action="store_true",
                        help="start the shipped config with `serve-app serve` on free ports first, stop it after")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    from serve_app.tools.supervisor import Run, stop_run  # here: Ray, only to read or stop a run

    server = None
    if args.start:
        server, args.run_file = start_server(Path(tempfile.mkdtemp(prefix="soak-")))
    run = Run.read(args.run_file)
    if run is None:
        print(f"no server: {args.run_file} does not exist (make serve, or --start)", file=sys.stderr)
        return 2
    try:
        result = run_soak(run.url if args.start else args.url, run.markers, args.duration, args.concurrency,
                          args.warmup, args.sample)
    finally:
        if server is not None:
            stop_run(run)
            server.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    print(f"{'PASS' if result['passed'] else 'FAIL'}: {result['goals']}; {args.out} and {args.out.with_suffix('.png')}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
