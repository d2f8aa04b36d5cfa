"""The model-server benchmark: our server against fair peers on the same models, in alternating
rounds on this machine (docs/performance.md).

    make bench                        # everything (~65 min)
    .venv/bin/python -m bench.harness --quick          # ~20 min: one-row and mixed-type cells at c=1,16, no levers
    .venv/bin/python -m bench.harness --servers ours,fastapi --workloads xgb-1 --rounds 3 --levers none

The peers (``SERVERS``): the minimal Ray Serve app (the floor Serve itself sets), the careful
FastAPI app with as many uvicorn workers as our config runs ingress replicas and with one,
and MLServer with as many parallel workers. Each round starts every server in turn (ours
first in odd rounds, last in even ones), measures all its cells and stops it: per workload
(bench/workloads.py) and concurrency, a warm-up wrk run, then a measured one
(bench/loadgen.py), with the CPU every process used (bench/cpushare.py) and the server's
memory. The report gives each cell's median over the rounds with its min-max, and computes
the goals from the medians. The in-process predict rate of each workload is the limit
(bench/inprocess.py). Then the levers: our server again with one change each, once, against
the shipped median. Results: bench.json, bench.md and bench.png in ``--out``.

Servers run one at a time, each on free ports; each Ray gets its own temp dir and is stopped
through it, so nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import httpx
import yaml

from bench import cpushare, inprocess, launch, loadgen, report
from bench.model_export import export_model
from bench.workloads import (WORKLOADS, Request, Workload, answered_labels, features, grpc_infer, grpc_labels, npy,
                             table_rows, v2_binary, v2_columns, v2_json)
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "serve_config.yaml"
SERVERS = ("ours", "serve-minimal", "fastapi", "fastapi-1", "mlserver")
RAY_SERVERS = ("ours", "serve-minimal")
GRPC_SERVERS = ("ours", "mlserver")  # the peers that serve the Open Inference Protocol's gRPC service
MLSERVER_VENV = ROOT / "bench" / ".mlserver-venv"
QUICK = {"workloads": ["xgb-1", "sklearn-1", "churn-1", "churn-1000"], "concurrency": [1, 16], "levers": [], "duration": 4.0,
         "warmup": 1.0, "limit_seconds": 0.5, "rounds": 3, "memory": False}


# -- the request each server's protocol makes of a workload (None: the server has no such format)
def request_for(server: str, workload: Workload, binary_format: str = "v2", expected=None) -> Request | None:
    """``expected``: the labels a correct answer holds (mixed-type workloads: checked before
    the cell is measured, on every server)."""
    if server not in SERVERS:
        raise ValueError(server)
    if workload.grpc:  # the same ModelInfer message for every server that speaks the protocol's gRPC
        return grpc_infer(workload.model, features(workload.model, workload.rows)) if server in GRPC_SERVERS else None
    if workload.table:  # the same per-column V2 JSON body for every server (MLServer: its PandasCodec)
        return v2_columns(workload.model, table_rows(workload.model, workload.rows), expected)
    X = features(workload.model, workload.rows)
    if server == "ours":
        if not workload.binary:
            return v2_json(workload.model, X)
        return v2_binary(workload.model, X) if binary_format == "v2" else npy(f"/v2/models/{workload.model}/infer", X)
    if server in ("serve-minimal", "fastapi", "fastapi-1"):  # bench/servers/careful_fastapi.py
        return npy(f"/predict_npy/{workload.model}", X) if workload.binary else v2_json(workload.model, X)
    if server == "mlserver":
        return None if workload.binary else v2_json(workload.model, X)  # MLServer's REST takes JSON only
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


def ingress_replicas(config: dict) -> int:
    """The replicas our ingress runs with no load: the process count every peer gets."""
    ingress = _ingress(config)
    return ingress.get("autoscaling_config", {}).get("min_replicas") or ingress.get("num_replicas", 1)


def minimal_serve_config(model_dir: Path, replicas: int, max_ongoing_requests: int) -> dict:
    """The minimal Serve reference: the careful FastAPI app as one deployment's ingress,
    ``replicas`` of it, Serve's access log off and user code on the replica's event loop
    (as in our shipped config), the same limit of requests per replica as ours."""
    return {"logging_config": {"encoding": "JSON", "enable_access_log": False},
            "applications": [{
                "name": "minimal", "route_prefix": "/", "import_path": "bench.servers.careful_fastapi:deployment",
                "args": {"model_dir": str(model_dir)},
                "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
                "deployments": [{"name": "MinimalServe", "num_replicas": replicas,
                                 "max_ongoing_requests": max_ongoing_requests}]}]}


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


def inline_below(ms: float) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        for model in _models(config):
            model["inline_below_ms"] = ms
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


def table_batch_rows(rows: int) -> Callable[[dict], None]:
    """The mixed-type demos' batches up to ``rows`` rows (shipped: 32,000, so 32 concurrent
    1000-row requests share a call, as MLServer's adaptive batching of 32 requests does; at 32
    rows a 1000-row request is a call of its own)."""
    def change(config: dict) -> None:
        for model in _models(config):
            if model["name"] in ("churn", "churn-xgb"):
                model["max_batch_size"] = rows
    return change


def every(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        for one in changes:
            one(config)
    return change


def fastapi_routing(config: dict) -> None:
    """Every route through FastAPI's routing, the inference routes too (shipped: the fast path)."""
    config["applications"][0]["args"]["fast_path"] = False


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
    cluster_env: tuple[tuple[str, str], ...] = ()  # environment of the whole Ray (read at ray start)


LEVERS = {lever.key: lever for lever in (
    Lever("default-proxy", "Ray's default proxy instead of HAProxy + direct ingress", ha_proxy=False),
    Lever("fastapi-routing", "inference routes through FastAPI (args.fast_path false)", fastapi_routing,
          concurrency=(1, 16, 64)),
    Lever("serve-access-log", "Ray Serve's access log on (a JSON line per request)", serve_access_log),
    Lever("log-every-request", "the app's access line for every request (access_log.sample_rate 1)",
          log_every_request),
    # Our models already run off the event loop (serve_app/serving/worker.py): Serve's own user-code
    # thread is a second thread hop per request; the shipped config turns it off.
    Lever("user-code-thread", "Serve's user-code thread on (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1)",
          replica_env(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="1")),
    Lever("model-thread", "every model call on the model thread (inline_below_ms 0)", inline_below(0.0),
          concurrency=(1, 16, 64)),
    Lever("haproxy-metrics-on", "HAProxy's per-request log line for Serve's HTTP metrics on (shipped: off)",
          cluster_env=(("RAY_SERVE_HAPROXY_METRICS_ENABLED", "1"),), concurrency=(1, 16, 64)),
    Lever("no-batching", "no batching (max_batch_size 1)", batching(1, 0.0)),
    # Shipped: wait 0, a batch is whatever queued while the model was busy.
    Lever("batch-wait-2ms", "batch wait 2 ms (shipped: 0)", batching(32, 0.002), concurrency=(1, 16, 64),
          workloads=("xgb-1", "churn-1", "churn-1000")),
    Lever("handle-hop", "model behind a DeploymentHandle (dedicated)", dedicated),
    Lever("replicas-1", "1 ingress replica (shipped: autoscaling 2-4)", replicas(1)),
    Lever("replicas-4", "4 ingress replicas", replicas(4)),
    Lever("npy", "application/x-npy instead of the V2 binary extension", binary_format="npy",
          workloads=("xgb-1000-binary",)),
    Lever("table-batch-32", "mixed-type batches of up to 32 rows (shipped: 32,000)", table_batch_rows(32),
          workloads=("churn-1", "churn-1000")),
)}


# -- the servers: each yields an Endpoint while it runs ------------------------------------------
@dataclass
class Endpoint:
    url: str
    session: int  # launch.session_memory counts its processes
    workers: Callable[[], int]  # processes serving requests now (replicas, uvicorn/MLServer workers)
    grpc_target: str | None = None  # host:port of its gRPC service, for the servers that have one


class Servers:
    """How to start each server of ``SERVERS`` for one round (Ray servers share one cluster)."""

    def __init__(self, run: "Run", store: Path, model_dir: Path):
        self.run, self.store, self.model_dir = run, store, model_dir
        self.replicas = ingress_replicas(our_config(store))

    @contextmanager
    def start(self, server: str, cluster: launch.RayCluster | None) -> Iterator[Endpoint]:
        log = self.run.logs / f"{server}-round{self.run.round}.log"
        if server == "ours":
            with launch.serve_run(cluster, our_config(self.store), log) as url:
                yield Endpoint(url, cluster.session, lambda: launch.running_replicas(cluster, "models", "ModelServer"),
                               cluster.grpc_target)
        elif server == "serve-minimal":
            config = minimal_serve_config(self.model_dir, self.replicas, _ingress(our_config(self.store))
                                          .get("max_ongoing_requests", 5))
            with launch.serve_run(cluster, config, log) as url:
                yield Endpoint(url, cluster.session, lambda: launch.running_replicas(cluster, "minimal", "MinimalServe"))
        elif server in ("fastapi", "fastapi-1"):
            workers = 1 if server == "fastapi-1" else self.replicas
            with launch.fastapi_server(self.model_dir, log, workers) as proc:
                yield Endpoint(proc.url, proc.session, lambda: workers)
        elif server == "mlserver":
            with launch.mlserver(self.run.args.mlserver_venv, self.model_dir, log, self.replicas) as proc:
                yield Endpoint(proc.url, proc.session, lambda: self.replicas, proc.grpc_target)
        else:
            raise ValueError(server)


# -- running cells ------------------------------------------------------------------------------
def _sample_memory(session: int, after_s: float, into: dict) -> threading.Thread:
    def sample() -> None:
        time.sleep(after_s)
        into.update(launch.session_memory(session))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


def cpu_per_request(used: dict[str, float], requests: int) -> dict[str, float]:
    """Microseconds of CPU per answered request, per process kind (largest first)."""
    return {kind: round(seconds / requests * 1e6, 1) for kind, seconds in used.items()
            if requests and seconds / requests * 1e6 >= 1}


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out
        self.scripts = self.out / "scripts"
        self.logs = self.out / "logs"
        for folder in (self.scripts, self.logs):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.round = 0
        self.samples: list[dict] = []  # one per server, workload, concurrency and round
        self.memory: list[dict] = []  # idle memory of each server, per round
        self.levers: list[dict] = []
        self.failures: list[dict] = []
        self.ray_temp_dirs: list[str] = []  # recorded so a test can check nothing of them survives
        self.expected: dict[str, tuple] = {}  # per mixed-type workload: the in-memory pipeline's labels

    def measure(self, server: str, endpoint: Endpoint, workload: Workload, concurrency: int, request: Request,
                label: str, slug: str) -> dict:
        """One cell; ``label`` names it in the progress lines, ``slug`` in file names."""
        url = endpoint.url
        if workload.grpc:  # h2load counts HTTP statuses: check a real gRPC answer first
            labels = grpc_labels(request, endpoint.grpc_target)
            reference = grpc_labels(request, endpoint.grpc_target)
            if not labels or labels != reference:
                raise RuntimeError(f"{label} {workload.key}: gRPC answers {labels[:5]} / {reference[:5]}")

            def load(seconds: float) -> dict:
                return loadgen.h2load(endpoint.grpc_target, request, self.scripts, f"{slug}-{workload.key}",
                                      concurrency, seconds)
        else:
            check = httpx.post(url + request.path, content=request.body, headers=request.headers, timeout=60)
            if check.status_code != 200:  # a wrong request would measure error pages
                raise RuntimeError(f"{label} {workload.key}: {check.status_code} {check.text[:500]}")
            if request.expected is not None:  # nor would wrong answers (say, strings decoded as bytes)
                labels = answered_labels(check.json())
                wrong = [i for i, (a, b) in enumerate(zip(labels, request.expected)) if a != b]
                if len(labels) != len(request.expected) or wrong:
                    raise RuntimeError(f"{label} {workload.key}: {len(wrong)} of {len(request.expected)} labels "
                                       f"differ from the in-memory pipeline's (first rows {wrong[:5]}): {check.text[:300]}")
            script = loadgen.write_script(request, self.scripts, f"{slug}-{workload.key}")

            def load(seconds: float) -> dict:
                return loadgen.wrk(url + request.path, script, concurrency, seconds)
        if self.args.warmup > 0:
            load(self.args.warmup)
        session = set(p.pid for p in launch.session_processes(endpoint.session))
        other_rays = launch.other_raylets(self.ray_temp_dirs)
        memory: dict = {}
        sampler = _sample_memory(endpoint.session, self.args.duration / 2, memory)
        before = cpushare.ticks()
        result = load(self.args.duration)
        after = cpushare.ticks()
        sampler.join()
        other_rays = max(other_rays, launch.other_raylets(self.ray_temp_dirs))
        session |= set(p.pid for p in launch.session_processes(endpoint.session))
        # CPU by process kind: the server's own processes by name, the load generator, the rest
        used = cpushare.cpu_seconds(before, {
            pid: (kind if int(pid) in session else kind if kind in ("wrk", "h2load") else "rest of the machine", n)
            for pid, (kind, n) in after.items()})
        requests = result["requests"] - result["non_2xx"]
        cell = {"server": server, "workload": workload.key, "rows": workload.rows, "concurrency": concurrency,
                "round": self.round, "bytes_per_request": len(request.body), **result,
                "rows_per_s": result["rps"] * workload.rows, "workers": endpoint.workers(),
                "memory_under_load": memory, "cpu_us_per_request": cpu_per_request(used, requests),
                "load_avg_1m": round(os.getloadavg()[0], 2), "other_ray_clusters": other_rays}
        print(f"  {label:<40} {workload.key:<16} c={concurrency:<3} {result['rps']:>8.0f} req/s "
              f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.1f} ms  errors "
              f"{result['non_2xx'] + result['socket_errors']}  workers {cell['workers']}  "
              f"(load {cell['load_avg_1m']})" + (f"  OTHER RAY RUNNING ({other_rays})" if other_rays else ""),
              flush=True)
        return cell

    def server_cells(self, server: str, endpoint: Endpoint) -> None:
        self.memory.append({"server": server, "round": self.round, "workers": endpoint.workers(),
                            **launch.session_memory(endpoint.session)})
        for key in self.args.workloads:
            workload = WORKLOADS[key]
            request = request_for(server, workload, expected=self.expected.get(key))
            if request is None:
                continue
            for concurrency in self.args.concurrency:
                self.samples.append(self.measure(server, endpoint, workload, concurrency, request, server, server))

    def lever_deployment(self, lever: Lever, cluster: launch.RayCluster, config: dict) -> None:
        """Deploy one lever's config and measure it; a lever that fails is recorded, and the run goes on."""
        try:
            with launch.serve_run(cluster, config, self.logs / f"lever-{lever.key}.log") as url:
                self.lever_cells(lever, Endpoint(url, cluster.session, lambda: launch.running_replicas(
                    cluster, "models", "ModelServer")))
        except Exception as exc:  # noqa: BLE001 - one broken variant must not lose a long run
            print(f"  lever {lever.key} failed: {exc}", flush=True)
            self.failures.append({"lever": lever.key, "error": str(exc)[:500]})

    def lever_cells(self, lever: Lever, endpoint: Endpoint) -> None:
        for key in lever.workloads:
            if key not in self.args.workloads:
                continue
            workload = WORKLOADS[key]
            request = request_for("ours", workload, lever.binary_format)
            for concurrency in lever.concurrency or self.args.lever_concurrency:
                cell = self.measure("ours", endpoint, workload, concurrency, request, lever.name[:40], lever.key)
                self.levers.append({"lever": lever.name, **cell})


def round_order(servers: list[str], round_number: int) -> list[str]:
    """Ours first in odd rounds and last in even ones, the peers in between: a slow drift of
    the machine falls on both sides alike. Ray servers stay adjacent (they share a cluster)."""
    ray = [s for s in SERVERS if s in servers and s in RAY_SERVERS]
    others = [s for s in SERVERS if s in servers and s not in RAY_SERVERS]
    order = ray + others
    return order if round_number % 2 else list(reversed(order))


def run_round(run: Run, servers: Servers) -> None:
    """Every server in turn; the Ray servers on one cluster (HAProxy fast path), which is up
    only while they run."""
    order = round_order(run.args.servers, run.round)
    last_ray = [s for s in order if s in RAY_SERVERS][-1:]
    with ExitStack() as ray:
        cluster = None
        for server in order:
            if server in RAY_SERVERS and cluster is None:
                launch.wait_for_other_rays(run.ray_temp_dirs, run.args.wait_for_other_ray)
                cluster = ray.enter_context(launch.ray_cluster(ha_proxy=True, work=run.logs))
                run.ray_temp_dirs.append(str(cluster.temp_dir))
            print(f"round {run.round}: {server} ({report.SERVER_TITLES[server]})", flush=True)
            with servers.start(server, cluster) as endpoint:
                run.server_cells(server, endpoint)
            if [server] == last_ray:
                ray.close()
                cluster = None


def after_rounds(run: Run, store: Path, results: dict) -> None:
    """Once, after the rounds: our memory with long-tail models loaded, and our server with one
    change each (the levers). What needs only a Serve config shares one cluster; a lever that
    changes Ray's environment gets a cluster of its own."""
    chosen = [LEVERS[key] for key in run.args.levers]
    groups = dict.fromkeys((lever.ha_proxy, lever.cluster_env) for lever in chosen)
    memory = run.args.memory and "ours" in run.args.servers
    if memory:
        groups = {(True, ()): None, **groups}
    for ha_proxy, env in groups:
        levers = [lever for lever in chosen if (lever.ha_proxy, lever.cluster_env) == (ha_proxy, env)]
        launch.wait_for_other_rays(run.ray_temp_dirs, run.args.wait_for_other_ray)
        with launch.ray_cluster(ha_proxy=ha_proxy, work=run.logs, extra_env=dict(env)) as cluster:
            run.ray_temp_dirs.append(str(cluster.temp_dir))
            if memory and (ha_proxy, env) == (True, ()):
                results["loaded_memory"] = loaded_memory(run, cluster, store)
            for lever in levers:
                print(f"lever: {lever.name}", flush=True)
                config = our_config(store)
                if lever.change is not None:
                    lever.change(config)
                run.lever_deployment(lever, cluster, config)


TAIL_MODELS = 8


def loaded_memory(run: Run, cluster: launch.RayCluster, store: Path) -> dict:
    """Our server's processes and memory idle, then with ``TAIL_MODELS`` long-tail models
    loaded by the multiplexed deployment (one request each)."""
    from serve_app.tools.train import train_model

    model_store = ModelStore(str(store))
    names = [f"tail-{i}" for i in range(TAIL_MODELS)]
    for name in names:
        if not model_store.list_models().get(name):
            train_model("wine", model_store, save_as=name)
    X = features("breast-cancer", 1)[:, :13]  # wine has 13 features
    with launch.serve_run(cluster, our_config(store), run.logs / "memory.log") as url:
        idle = launch.session_memory(cluster.session)
        for name in names:
            request = v2_json(name, X)
            response = httpx.post(url + request.path, content=request.body, headers=request.headers, timeout=120)
            response.raise_for_status()
        loaded = launch.session_memory(cluster.session)
    print(f"  memory: idle {idle}, with {TAIL_MODELS} long-tail models {loaded}", flush=True)
    return {"idle": idle, "tail_models": TAIL_MODELS, "with_tail_models": loaded}


def median_cells(samples: list[dict]) -> list[dict]:
    """One cell per server, workload and concurrency: the median of its rounds (throughput,
    latency percentiles, CPU per request), with the spread of requests/s."""
    groups: dict[tuple, list[dict]] = {}
    for sample in samples:
        groups.setdefault((sample["server"], sample["workload"], sample["concurrency"]), []).append(sample)
    cells = []
    for (server, workload, concurrency), rounds in groups.items():
        med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
        kinds = {k for r in rounds for k in r["cpu_us_per_request"]}
        cpu = {k: round(statistics.median(r["cpu_us_per_request"].get(k, 0.0) for r in rounds), 1) for k in kinds}
        cells.append({
            "server": server, "workload": workload, "concurrency": concurrency, "rows": rounds[0]["rows"],
            "bytes_per_request": rounds[0]["bytes_per_request"], "rounds": len(rounds),
            **{key: med(key) for key in ("rps", "rows_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")},
            "rps_min": min(r["rps"] for r in rounds), "rps_max": max(r["rps"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds), "non_2xx": sum(r["non_2xx"] for r in rounds),
            "socket_errors": sum(r["socket_errors"] for r in rounds),
            "rounds_beside_other_ray": sum(bool(r.get("other_ray_clusters")) for r in rounds),
            "workers": sorted({r["workers"] for r in rounds}),
            "rss_mb_under_load": med_or_none([r["memory_under_load"].get("rss_mb") for r in rounds]),
            "cpu_us_per_request": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        })
    return cells


def med_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def idle_memory(memory: list[dict]) -> dict[str, dict]:
    """Per server: the median over rounds of its processes and memory before any load."""
    by_server: dict[str, list[dict]] = {}
    for entry in memory:
        by_server.setdefault(entry["server"], []).append(entry)
    return {server: {key: med_or_none([e.get(key) for e in entries])
                     for key in ("workers", "processes", "rss_mb", "pss_mb")}
            for server, entries in by_server.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    parser.add_argument("--quick", action="store_true",
                        help="development run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                        + " (explicit options win)")
    parser.add_argument("--servers", type=csv, default=list(SERVERS), help=f"subset of {','.join(SERVERS)}")
    parser.add_argument("--workloads", type=csv, help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--concurrency", type=lambda t: [int(c) for c in csv(t)], help="default: 1,16,64")
    parser.add_argument("--lever-concurrency", type=lambda t: [int(c) for c in csv(t)], default=[16, 64])
    parser.add_argument("--levers", type=lambda t: [] if t == "none" else csv(t),
                        help=f"subset of {','.join(LEVERS)}, or none (default: all)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per cell (default 3)")
    parser.add_argument("--limit-seconds", type=float, help="seconds per in-process measurement (default 2)")
    parser.add_argument("--duration", type=float, help="seconds measured per cell (default 8)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each cell, not recorded (default 2)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help=f"measure our memory with {TAIL_MODELS} long-tail models loaded (default: on, "
                             "off with --quick)")
    # absolute: the store's path goes into the Serve config, read by replicas in other directories
    parser.add_argument("--out", type=lambda text: Path(text).resolve(), default=ROOT / "bench" / "results")
    parser.add_argument("--mlserver-venv", type=Path, default=MLSERVER_VENV)
    parser.add_argument("--wait-for-other-ray", type=float, default=0.0, metavar="SECONDS",
                        help="before each Ray start, wait up to this long until no other Ray runs on the machine "
                             "(a shared machine; default 0: start at once). Cells measured beside another Ray "
                             "are flagged either way (other_ray_clusters)")
    args = parser.parse_args(argv)
    defaults = {"workloads": list(WORKLOADS), "concurrency": [1, 16, 64], "levers": list(LEVERS), "rounds": 3,
                "limit_seconds": 2.0, "duration": 8.0, "warmup": 2.0, "memory": True}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    for name, chosen, known in (("server", args.servers, SERVERS), ("workload", args.workloads, WORKLOADS),
                                ("lever", args.levers, LEVERS)):
        if set(chosen) - set(known):
            parser.error(f"unknown {name}(s) {sorted(set(chosen) - set(known))}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a kill, a CI timeout) unwinds like Ctrl-C: every server and Ray of the run is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (make bench installs it: apt-get install wrk)")
    if "mlserver" in args.servers and not (args.mlserver_venv / "bin" / "mlserver").exists():
        sys.exit(f"no MLServer in {args.mlserver_venv} (make bench creates it from bench/mlserver-requirements.txt)")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    results = {"meta": {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "cores": os.cpu_count(), "duration_s": args.duration, "warmup_s": args.warmup,
                        "rounds": args.rounds, "concurrency": args.concurrency, "load_before": os.getloadavg()}}
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

    for key in args.workloads:  # what every server must answer to a mixed-type workload
        if WORKLOADS[key].table:
            pipeline = load_runtime(store, WORKLOADS[key].model).model
            run.expected[key] = tuple(pipeline.predict(table_rows(WORKLOADS[key].model, WORKLOADS[key].rows)).tolist())

    print("in-process limits", flush=True)
    results["in_process"] = {key: inprocess.predict_rate(store, WORKLOADS[key].model, WORKLOADS[key].rows,
                                                         args.limit_seconds) for key in args.workloads}
    if any(WORKLOADS[k].rows > 1 for k in args.workloads):
        results["codecs"] = inprocess.codec_costs(store, "breast-cancer", 1000, args.limit_seconds / 2)
    tables = sorted({WORKLOADS[k].model for k in args.workloads if WORKLOADS[k].table})
    if tables:
        results["table_codecs"] = {model: inprocess.table_codec_costs(store, model, seconds=args.limit_seconds / 2)
                                   for model in tables}

    servers = Servers(run, store_path, model_dir)
    results["meta"]["ingress_replicas"] = servers.replicas
    for number in range(1, args.rounds + 1):
        run.round = number
        run_round(run, servers)
    after_rounds(run, store_path, results)

    results["meta"].update(load_after=os.getloadavg(), wall_s=round(time.monotonic() - started),
                           ray_temp_dirs=run.ray_temp_dirs)
    results["cells"], results["samples"] = median_cells(run.samples), run.samples
    results["memory"], results["levers"], results["failures"] = idle_memory(run.memory), run.levers, run.failures
    results["memory_rounds"] = run.memory
    report.write(results, args.out)
    print(report.markdown(results))
    print(f"results: {args.out}/bench.{{json,md,png}} ({results['meta']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
