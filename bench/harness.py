"""The model-server benchmark: our server against a hand-rolled FastAPI app, MLServer and a
tutorial-style Ray Serve app, on the same models, in one run on this machine.

    make bench                                  # everything (~20 min); or, e.g.:
    .venv/bin/python -m bench.harness --servers ours,fastapi --workloads xgb-1 --duration 3 --levers none

Per server, per workload (bench/workloads.py), per concurrency: a warm-up wrk run, then a
measured one (bench/loadgen.py). The in-process predict rate of each workload is the limit
(bench/inprocess.py). Then the levers: our server again with one change each (ingress,
access log, batching, handle hop, replicas) on single-row XGBoost. Results: bench.json,
bench.md (table, ratios against FastAPI, goals) and bench.png in ``--out``.

Servers run one at a time, each on free ports; each Ray gets its own temp dir and is stopped
through it, so nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import httpx
import yaml

from bench import inprocess, launch, loadgen, report
from bench.model_export import export_model
from bench.workloads import WORKLOADS, Request, Workload, features, instances, npy, v2_binary, v2_json
from serve_app.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "serve_config.yaml"
SERVERS = ("fastapi", "mlserver", "ours", "ray-naive")
MLSERVER_VENV = ROOT / "bench" / ".mlserver-venv"


# -- the request each server's protocol makes of a workload (None: the server has no such format)
def request_for(server: str, workload: Workload, binary_format: str = "v2") -> Request | None:
    X = features(workload.model, workload.rows)
    if server == "ours":
        if not workload.binary:
            return v2_json(workload.model, X)
        return v2_binary(workload.model, X) if binary_format == "v2" else npy(f"/v2/models/{workload.model}/infer", X)
    if server == "fastapi":
        return npy(f"/predict_npy/{workload.model}", X) if workload.binary else instances(f"/predict/{workload.model}", X)
    if server == "mlserver":
        return None if workload.binary else v2_json(workload.model, X)  # MLServer's REST takes JSON only
    if server == "ray-naive":
        return None if workload.binary else instances(f"/{workload.model}", X)
    raise ValueError(server)


# -- our server's config, and the levers: one change each ------------------------------------
def our_config(store: Path) -> dict:
    """The shipped config; only the store differs (models are trained before the run)."""
    config = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    args = config["applications"][0]["args"]
    args.update(store=str(store), train_if_missing=False)
    return config


def _models(config: dict) -> list[dict]:
    return config["applications"][0]["args"]["models"]


def _ingress(config: dict) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == "ModelServer")


def serve_access_log(config: dict) -> None:
    """Ray Serve's own JSON access line for every request (the shipped config has it off)."""
    config["logging_config"]["enable_access_log"] = True


def log_every_request(config: dict) -> None:
    """The app's own access line for every request (shipped: errors, slow, traced, 1 %)."""
    config["applications"][0]["args"].setdefault("access_log", {})["sample_rate"] = 1.0


def replica_env(**env_vars: str) -> Callable[[dict], None]:
    """Environment variables for the application's replicas (Serve's runtime_env), e.g. Serve's
    own logging switches, which replicas read when they start."""
    def change(config: dict) -> None:
        app = config["applications"][0]
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
    return change


def batching(size: int, wait_s: float) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        for model in _models(config):
            model.update(max_batch_size=size, batch_wait_timeout_s=wait_s)
    return change


def replicas(n: int) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        ingress = _ingress(config)
        ingress.pop("autoscaling_config", None)
        ingress["num_replicas"] = n
        # Logical CPUs are scheduling tokens: n replicas must fit Ray's count of the real cores
        # beside the dedicated and the multiplexed deployments' 0.25 each.
        cores = os.cpu_count() or 2
        ingress.setdefault("ray_actor_options", {})["num_cpus"] = min(0.5, (cores - 0.5) / n)
    return change


def every(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        for one in changes:
            one(config)
    return change


def dedicated(config: dict) -> None:
    """breast-cancer in a deployment of its own: one DeploymentHandle hop per request. Its one
    replica asks for a quarter CPU, like the shipped dedicated model: at Serve's default of one
    CPU the second ingress replica finds no room on two cores and never starts."""
    next(m for m in _models(config) if m["name"] == "breast-cancer")["dedicated"] = True
    config["applications"][0]["deployments"].append(
        {"name": "model-breast-cancer", "num_replicas": 1, "max_ongoing_requests": 64,
         "ray_actor_options": {"num_cpus": 0.25}})


@dataclass(frozen=True)
class Lever:
    key: str
    name: str
    change: Callable[[dict], None] | None = None
    ha_proxy: bool = True
    binary_format: str = "v2"
    workloads: tuple[str, ...] = ("xgb-1",)
    concurrency: tuple[int, ...] | None = None  # None: --lever-concurrency


LEVERS = {lever.key: lever for lever in (
    Lever("default-proxy", "Ray's default proxy instead of HAProxy + direct ingress", ha_proxy=False),
    Lever("serve-access-log", "Ray Serve's access log on (a JSON line per request)", serve_access_log),
    Lever("log-every-request", "the app's access line for every request (access_log.sample_rate 1)",
          log_every_request),
    # Our models already run off the event loop (serve_app/serving/worker.py): Serve's own user-code
    # thread is a second thread hop per request; the shipped config turns it off.
    Lever("user-code-thread", "Serve's user-code thread on (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1)",
          replica_env(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="1")),
    Lever("no-batching", "no batching (max_batch_size 1)", batching(1, 0.0)),
    # Shipped: wait 0, a batch is whatever queued while the model was busy.
    Lever("batch-wait-2ms", "batch wait 2 ms (shipped: 0)", batching(32, 0.002), concurrency=(1, 16, 64)),
    Lever("handle-hop", "model behind a DeploymentHandle (dedicated)", dedicated),
    Lever("replicas-1", "1 ingress replica (shipped: autoscaling 2-4)", replicas(1)),
    Lever("replicas-4", "4 ingress replicas", replicas(4)),
    Lever("npy", "application/x-npy instead of the V2 binary extension", binary_format="npy",
          workloads=("xgb-1000-binary",)),
)}


# -- running cells ------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.scripts = self.out / "scripts"
        self.logs = self.out / "logs"
        for folder in (self.scripts, self.logs):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.cells: list[dict] = []
        self.levers: list[dict] = []
        self.failures: list[dict] = []
        self.ray_temp_dirs: list[str] = []  # recorded so a test can check nothing of them survives

    def measure(self, server: str, url: str, workload: Workload, concurrency: int, request: Request,
                label: str, slug: str) -> dict:
        """One cell; ``label`` names it in the progress lines, ``slug`` in file names."""
        check = httpx.post(url + request.path, content=request.body, headers=request.headers, timeout=60)
        if check.status_code != 200:  # a wrong request would measure error pages
            raise RuntimeError(f"{label} {workload.key}: {check.status_code} {check.text[:500]}")
        script = loadgen.write_script(request, self.scripts, f"{slug}-{workload.key}")
        result = loadgen.measure(url + request.path, script, concurrency, self.args.duration, self.args.warmup)
        cell = {"server": server, "workload": workload.key, "rows": workload.rows, "concurrency": concurrency,
                "bytes_per_request": len(request.body), **result, "rows_per_s": result["rps"] * workload.rows,
                "load_avg_1m": round(os.getloadavg()[0], 2)}
        print(f"  {label:<40} {workload.key:<16} c={concurrency:<3} {result['rps']:>8.0f} req/s "
              f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  errors "
              f"{result['non_2xx'] + result['socket_errors']}  (load {cell['load_avg_1m']})", flush=True)
        return cell

    def server_cells(self, server: str, url: str) -> None:
        for key in self.args.workloads:
            workload = WORKLOADS[key]
            request = request_for(server, workload)
            if request is None:
                continue
            for concurrency in self.args.concurrency:
                self.cells.append(self.measure(server, url, workload, concurrency, request, server, server))

    def lever_deployment(self, lever: Lever, cluster: launch.RayCluster, config: dict) -> None:
        """Deploy one lever's config and measure it; a lever that fails is recorded, and the run goes on."""
        try:
            with launch.serve_run(cluster, config, self.logs / f"lever-{lever.key}.log") as url:
                self.lever_cells(lever, url)
        except Exception as exc:  # noqa: BLE001 - one broken variant must not lose a 20-minute run
            print(f"  lever {lever.key} failed: {exc}", flush=True)
            self.failures.append({"lever": lever.key, "error": str(exc)[:500]})

    def lever_cells(self, lever: Lever, url: str) -> None:
        for key in lever.workloads:
            if key not in self.args.workloads:
                continue
            workload = WORKLOADS[key]
            request = request_for("ours", workload, lever.binary_format)
            for concurrency in lever.concurrency or self.args.lever_concurrency:
                cell = self.measure("ours", url, workload, concurrency, request, lever.name[:40], lever.key)
                self.levers.append({"lever": lever.name, **cell})


def run_ray_servers(run: Run, store: Path, model_dir: Path) -> None:
    """Ours (and its levers) on a Ray with the HAProxy fast path, then the naive app (and our
    server behind the same default proxy) on a Ray with Serve's defaults."""
    args = run.args
    chosen = [LEVERS[key] for key in args.levers]
    levers = [lever for lever in chosen if lever.ha_proxy]
    if "ours" in args.servers or levers:
        with launch.ray_cluster(ha_proxy=True, work=run.logs) as cluster:
            run.ray_temp_dirs.append(str(cluster.temp_dir))
            if "ours" in args.servers:
                print("ours (shipped config, HAProxy + direct ingress)", flush=True)
                with launch.serve_run(cluster, our_config(store), run.logs / "ours.log") as url:
                    run.server_cells("ours", url)
                    for lever in (lv for lv in levers if lv.change is None):  # same deployment
                        run.lever_cells(lever, url)
            for lever in (lv for lv in levers if lv.change is not None):
                print(f"lever: {lever.name}", flush=True)
                config = our_config(store)
                lever.change(config)
                run.lever_deployment(lever, cluster, config)
    default_proxy_lever = next((lever for lever in chosen if not lever.ha_proxy), None)
    if "ray-naive" in args.servers or default_proxy_lever:
        with launch.ray_cluster(ha_proxy=False, work=run.logs) as cluster:
            run.ray_temp_dirs.append(str(cluster.temp_dir))
            if "ray-naive" in args.servers:
                print("ray-naive (tutorial-style deployment, Serve defaults)", flush=True)
                config = {"applications": [
                    {"name": f"naive-{m}", "route_prefix": f"/{m}", "import_path": "bench.servers.ray_naive:app",
                     "args": {"model_dir": str(model_dir), "model": m}} for m in ("breast-cancer", "iris")]}
                with launch.serve_run(cluster, config, run.logs / "ray-naive.log") as url:
                    run.server_cells("ray-naive", url)
            if default_proxy_lever:
                print(f"lever: {default_proxy_lever.name}", flush=True)
                run.lever_deployment(default_proxy_lever, cluster, our_config(store))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    parser.add_argument("--servers", type=csv, default=list(SERVERS), help=f"subset of {','.join(SERVERS)}")
    parser.add_argument("--workloads", type=csv, default=list(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--concurrency", type=lambda t: [int(c) for c in csv(t)], default=[1, 16, 64])
    parser.add_argument("--lever-concurrency", type=lambda t: [int(c) for c in csv(t)], default=[16, 64])
    parser.add_argument("--levers", type=lambda t: [] if t == "none" else csv(t), default=list(LEVERS),
                        help=f"subset of {','.join(LEVERS)}, or none")
    parser.add_argument("--limit-seconds", type=float, default=2.0, help="seconds per in-process measurement")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each cell, not recorded")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--mlserver-venv", type=Path, default=MLSERVER_VENV)
    args = parser.parse_args(argv)
    for name, chosen, known in (("server", args.servers, SERVERS), ("workload", args.workloads, WORKLOADS),
                                ("lever", args.levers, LEVERS)):
        if set(chosen) - set(known):
            parser.error(f"unknown {name}(s) {sorted(set(chosen) - set(known))}")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (make bench installs it: apt-get install wrk)")
    if "mlserver" in args.servers and not (args.mlserver_venv / "bin" / "mlserver").exists():
        sys.exit(f"no MLServer in {args.mlserver_venv} (make bench creates it from bench/mlserver-requirements.txt)")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results = {"meta": {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "cores": os.cpu_count(), "duration_s": args.duration, "warmup_s": args.warmup,
                        "concurrency": args.concurrency, "load_before": os.getloadavg()}}
    run = Run(args)

    # The same trained models for everyone: our store, and its export for the others.
    from serve_app.tools.train import ensure_models

    store_path, model_dir = args.out / "model_store", args.out / "models"
    store = ModelStore(str(store_path))
    models = sorted({WORKLOADS[w].model for w in args.workloads})
    ensure_models(store, sorted({*models, *(m["name"] for m in _models(our_config(store_path)))}))
    shutil.rmtree(model_dir, ignore_errors=True)
    for model in models:
        export_model(store, model, model_dir, max_batch_size=32, max_batch_time_s=0.002)

    print("in-process limits", flush=True)
    results["in_process"] = {key: inprocess.predict_rate(store, WORKLOADS[key].model, WORKLOADS[key].rows,
                                                         args.limit_seconds) for key in args.workloads}
    if any(WORKLOADS[k].rows > 1 for k in args.workloads):
        results["codecs"] = inprocess.codec_costs(store, "breast-cancer", 1000, args.limit_seconds / 2)

    for server in ("fastapi", "mlserver"):
        if server in args.servers:
            print(server, flush=True)
            with ExitStack() as stack:
                log = run.logs / f"{server}.log"
                url = stack.enter_context(launch.fastapi_server(model_dir, log) if server == "fastapi"
                                          else launch.mlserver(args.mlserver_venv, model_dir, log))
                run.server_cells(server, url)
    run_ray_servers(run, store_path, model_dir)

    results["meta"].update(load_after=os.getloadavg(), wall_s=round(time.monotonic() - started),
                           ray_temp_dirs=run.ray_temp_dirs)
    results["cells"], results["levers"], results["failures"] = run.cells, run.levers, run.failures
    report.write(results, args.out)
    print(report.markdown(results))
    print(f"results: {args.out}/bench.{{json,md,png}} ({results['meta']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
