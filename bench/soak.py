"""Soak test: steady load for a long time, then errors and replica memory growth.

    make soak                                   # 10 minutes against a fresh local `serve run`
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --ray-temp-dir /tmp/ray --duration 600

Load: ``concurrency`` threads, each sending single-row predictions in turn to every model of
the shipped config (V1 and V2 alternating). Memory: the resident set size of the Serve replica
processes of the Ray cluster whose temp dir is given (other local Ray clusters are ignored),
sampled after the warm-up and at the end; growth is end / after-warm-up - 1, summed over the
replicas that lived through the whole run. Goals (docs/reliability-security.md): 0 errors,
< 10 % RSS growth. The test suite runs the same function for 30 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

# One valid row per demo model, in feature order.
ROWS = {
    "iris": [5.1, 3.5, 1.4, 0.2],
    "breast-cancer": [17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
                      1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003,
                      0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189],
    "diabetes": [0.038, 0.050, 0.061, 0.021, -0.044, -0.034, -0.043, -0.002, 0.019, -0.017],
}


def replica_processes(ray_temp_dir: str) -> list[psutil.Process]:
    """Serve replica processes of the Ray cluster that uses ``ray_temp_dir``."""
    replicas = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if any(ray_temp_dir in arg for arg in cmdline) and "raylet" in (proc.info["name"] or ""):
                replicas += [c for c in proc.children(recursive=True) if "ServeReplica" in " ".join(c.cmdline())]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return replicas


def rss_by_pid(processes: list[psutil.Process]) -> dict[int, int]:
    sizes = {}
    for proc in processes:
        try:
            sizes[proc.pid] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return sizes


def run_soak(url: str, ray_temp_dir: str, duration_s: float, concurrency: int = 8,
             warmup_s: float = 10.0, models: tuple[str, ...] = tuple(ROWS)) -> dict:
    counts = {"ok": 0, "errors": 0}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(worker: int) -> None:
        requests = itertools.cycle([(m, p) for m in models for p in ("v1", "v2")])
        with httpx.Client(base_url=url, timeout=30) as client:
            for model, protocol in itertools.islice(requests, worker, None):
                if stop.is_set():
                    return
                row = ROWS[model]
                try:
                    if protocol == "v1":
                        response = client.post(f"/v1/models/{model}:predict", json={"instances": [row]})
                    else:
                        response = client.post(f"/v2/models/{model}/infer", json={"inputs": [
                            {"name": "x", "shape": [1, len(row)], "datatype": "FP64", "data": row}]})
                    ok, why = response.status_code == 200, f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                with lock:
                    counts["ok" if ok else "errors"] += 1
                    if not ok and len(errors) < 20:
                        errors.append(f"{model} {protocol}: {why}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    replicas = replica_processes(ray_temp_dir)
    rss_start = rss_by_pid(replicas)
    at_warmup = dict(counts)
    time.sleep(max(duration_s - warmup_s, 0))
    rss_end = rss_by_pid(replicas)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    survivors = sorted(set(rss_start) & set(rss_end))
    before, after = sum(rss_start[p] for p in survivors), sum(rss_end[p] for p in survivors)
    return {
        "duration_s": round(elapsed, 1), "concurrency": concurrency, "models": list(models),
        "requests": counts["ok"] + counts["errors"], "errors": counts["errors"], "error_samples": errors,
        "requests_per_s": round((counts["ok"] + counts["errors"] - sum(at_warmup.values()))
                                / max(elapsed - warmup_s, 1e-9), 1),
        "replicas_measured": len(survivors),
        "rss_after_warmup_mb": round(before / 2**20, 1), "rss_end_mb": round(after / 2**20, 1),
        "rss_growth": round(after / before - 1, 4) if before else None,
    }


def start_server(url: str):
    import subprocess

    from serve_app.tools.localserve import wait_ready

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "configs/serve_config.yaml"],
                            cwd=root, start_new_session=True)
    wait_ready(f"{url}/v1/models", proc)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--ray-temp-dir", default="/tmp/ray")
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--start", action="store_true",
                        help="start `serve run` of the shipped config first (as `make serve` does), stop it after")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()
    server = start_server(args.url) if args.start else None
    try:
        result = run_soak(args.url, args.ray_temp_dir, args.duration, args.concurrency)
    finally:
        if server is not None:
            from serve_app.tools.localserve import stop_process_group

            stop_process_group(server)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    passed = result["errors"] == 0 and result["rss_growth"] is not None and result["rss_growth"] < 0.10
    print("PASS" if passed else "FAIL", "(goals: 0 errors, < 10% replica RSS growth)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
