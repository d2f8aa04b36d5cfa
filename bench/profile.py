"""Where a replica's time goes on one-row requests: py-spy samples of every serving process of a
server under wrk load, summarised by the code that owns each sample.

    .venv/bin/python -m bench.profile --server ours --workload xgb-1 --concurrency 16 --seconds 15
    .venv/bin/python -m bench.profile --server serve-minimal      # the floor Serve sets

Starts the server as ``make bench`` does (bench/harness.py), loads it with wrk, and records each
serving process (Serve replicas, uvicorn workers) with ``py-spy record --format raw``. The
summary attributes each sample to the innermost frame of a package we name (``OWNERS``), so
"ray.serve" is Serve's own request path, "serve_app" ours, "starlette"/"fastapi" the ASGI
framework, "idle" the event loop waiting. Writes ``<out>/<server>-<pid>.txt`` (collapsed stacks:
``flamegraph.pl`` or speedscope read them) and ``<out>/profile.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench import harness, launch, loadgen
from bench.model_export import export_model
from bench.workloads import WORKLOADS
from serve_app.store import ModelStore

# (substring of a frame's file path, owner): the first match from the innermost frame outwards
# py-spy names a frame "function (path:line)", the path relative to site-packages or the cwd.
OWNERS = (
    ("serve_app/", "serve_app"), ("bench/servers/", "user code"),
    ("xgboost/", "model"), ("sklearn/", "model"), ("numpy/", "numpy"), ("orjson", "json"), ("json/", "json"),
    ("ray/serve/", "ray.serve"), ("ray/util/metrics", "ray metrics"), ("ray/", "ray core"),
    ("fastapi/", "fastapi"), ("starlette/", "starlette"), ("pydantic", "pydantic"),
    ("uvicorn/", "uvicorn"), ("h11/", "uvicorn"), ("httptools/", "uvicorn"), ("anyio/", "anyio"),
    ("logging/", "logging"), ("asyncio/", "asyncio"), ("concurrent/", "threads"), ("threading.py", "threads"),
)
# Frames whose inclusive share says what a layer costs with everything it calls.
LAYERS = (("Replica._direct_ingress_asgi", "Serve direct ingress, all of it"),
          ("ASGIAppReplicaWrapper.__call__", "the ASGI app (framework + routes)"),
          ("ModelServer.", "our routes (ModelServer methods)"), ("RequestLifecycle.finish", "our lifecycle finish"),
          ("ModelWorker.infer", "ModelWorker.infer (event-loop side)"),
          ("ModelWorker._compute", "model thread: _compute"), ("inplace_predict", "XGBoost inplace_predict"),
          ("_process_batches", "serve.batch queue loop"), ("bodies.py", "reading the body"),
          ("decode_request", "decoding"), ("encode_response", "encoding"), ("telemetry.py", "our metrics"),
          ("ray/util/metrics", "Ray metrics API"), ("logging/", "logging"))


def owner(frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, name in OWNERS:
            if f"({needle}" in frame:
                return name
    return "other"


def summarise(raw: Path) -> tuple[Counter, Counter, int]:
    """Samples per owner (innermost named frame) and per layer (inclusive) of one process's
    collapsed stacks, threads included, and the number of samples."""
    owners, layers, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not (stack and count.isdigit()):
            continue
        frames, n = stack.split(";"), int(count)
        total += n
        owners[owner(frames)] += n
        for marker, name in LAYERS:
            if marker in stack:
                layers[name] += n
    return owners, layers, total


def serving_pids(server: str, session: int) -> list[int]:
    """The processes that serve requests: Serve replicas of the app, or uvicorn's workers."""
    pids = []
    for proc in launch.session_processes(session):
        try:
            cmdline = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - a process that ended meanwhile
            continue
        if "ServeReplica:" in cmdline and ("ModelServer" in cmdline or "MinimalServe" in cmdline):
            pids.append(proc.pid)
        elif server.startswith("fastapi") and "multiprocessing" in cmdline or (
                server == "fastapi-1" and "uvicorn" in cmdline):
            pids.append(proc.pid)
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="ours", choices=[s for s in harness.SERVERS if s != "mlserver"])
    parser.add_argument("--workload", default="xgb-1", choices=list(WORKLOADS))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=harness.ROOT / "bench" / "results" / "profile")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    bench_args = harness.parse_args(["--out", str(args.out), "--servers", args.server, "--levers", "none"])
    run = harness.Run(bench_args)
    store_path, model_dir = args.out / "model_store", args.out / "models"
    store = ModelStore(str(store_path))
    workload = WORKLOADS[args.workload]
    from serve_app.tools.train import ensure_models

    ensure_models(store, sorted({workload.model, *(m["name"] for m in harness._models(harness.our_config(store_path)))}))
    export_model(store, workload.model, model_dir, max_batch_size=32, max_batch_time_s=0.002)
    servers = harness.Servers(run, store_path, model_dir)
    request = harness.request_for(args.server, workload)

    with launch.ray_cluster(ha_proxy=True, work=run.logs) if args.server in harness.RAY_SERVERS \
            else _no_cluster() as cluster:
        with servers.start(args.server, cluster) as endpoint:
            script = loadgen.write_script(request, run.scripts, f"profile-{workload.key}")
            loadgen.wrk(endpoint.url + request.path, script, args.concurrency, 3)  # warm-up
            pids = serving_pids(args.server, endpoint.session)
            load: dict = {}
            loader = threading.Thread(target=lambda: load.update(loadgen.wrk(
                endpoint.url + request.path, script, args.concurrency, args.seconds + 4)))
            loader.start()
            outputs = {pid: args.out / f"{args.server}-{pid}.txt" for pid in pids}
            spies = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate",
                                       str(args.rate), "--duration", str(round(args.seconds)), "--threads",
                                       "--nonblocking", "-o", str(path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for pid, path in outputs.items()]
            for spy in spies:
                spy.wait()
            loader.join()

    title = (f"{args.server}, {workload.key}, c={args.concurrency}: {load.get('rps', 0):,.0f} req/s under py-spy "
             f"({args.rate} Hz, {args.seconds:.0f} s, {len(pids)} processes)")
    text = report([path for path in outputs.values() if path.exists()], title)
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


def report(paths: list[Path], title: str) -> str:
    """The owners and layers tables of some processes' collapsed stacks (busy samples only:
    py-spy leaves out idle threads)."""
    owners, layers, total = Counter(), Counter(), 0
    for path in paths:
        o, la, t = summarise(path)
        owners.update(o)
        layers.update(la)
        total += t
    lines = [title, "", "| owner (innermost named frame) | share of busy samples |", "|---|---|"]
    lines += [f"| {name} | {n / total:.1%} |" for name, n in owners.most_common()]
    lines += ["", "| layer (inclusive) | share of busy samples |", "|---|---|"]
    lines += [f"| {name} | {layers[name] / total:.1%} |" for _, name in LAYERS if layers[name]]
    return "\n".join(lines) + "\n"


class _no_cluster:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
