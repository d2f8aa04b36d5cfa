"""The batch cell: rows/s of ``serve-app score`` (Ray Data) against the model in-process and
against HTTP scoring (docs/batch-scoring.md#figures).

    python -m bench.batch [--rows 2000000] [--rounds 3] [--model churn] [--no-http]

Cells, each the median of ``--rounds`` rounds (with min and max):

- ``in-process``: the runtime's ``predict`` on the generated table in ``--batch-rows`` chunks, one
  process, one core, no validation: the limit of one core;
- ``scorer, no Ray``: one scoring actor's work (validation, ``predict_proba``, the output table)
  called in this process: what one core can give batch scoring before Ray's own costs;
- ``score, 1 node``: :func:`serve_app.scoring.score` (what ``serve-app score`` runs) on a local Ray
  head with every core of this machine, as the command's default local Ray has;
- ``score, 1 worker`` / ``score, 2 workers``: the same on a multi-node local Ray shaped like the
  RayJob (a head with 0 CPUs, the driver only; worker nodes of ``--worker-cpus`` CPUs each);
- ``http-1`` / ``http-1000``: the same model through ``serve run`` of the shipped config with the
  fast path (``make serve``), 1-row and 1000-row V2 requests from wrk (``--connections``).

Scoring rows/s exclude start-up (the cluster's ``ray start`` and the driver's connection, reported
separately): the time of reading, validating, scoring and writing the table. The table is the
churn demo's generator (deterministic for a seed), written once as Parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from bench import launch, loadgen
from bench.harness import our_config, request_for
from bench.workloads import WORKLOADS
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore
from serve_app.tools.localserve import ensure_ray_token, free_port, stop_ray_cluster

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results" / "batch.json"
HTTP_WORKLOADS = {"churn": ("churn-1", "churn-1000")}


def generate(path: Path, model: str, rows: int, seed: int = 11) -> None:
    """``rows`` rows of the model's table (key column ``customer_id``), as one Parquet file."""
    from serve_app.tools.train import churn_table

    if model not in HTTP_WORKLOADS:
        raise SystemExit(f"--model: one of {sorted(HTTP_WORKLOADS)}")
    frame, _ = churn_table(rows=rows, seed=seed)
    frame.insert(0, "customer_id", np.arange(rows))
    frame.to_parquet(path, row_group_size=100_000)


def in_process(store: ModelStore, model: str, source: Path, batch_rows: int) -> float:
    """Rows/s of the runtime's own predict on the whole table, one process, one core."""
    import pyarrow.parquet as pq

    runtime = load_runtime(store, model)
    frame = pq.read_table(source).to_pandas()
    features = runtime.meta.feature_names
    chunks = [runtime.prepare({f: part[f].to_numpy() for f in features})
              for part in (frame.iloc[i:i + batch_rows] for i in range(0, len(frame), batch_rows))]
    started = time.perf_counter()
    for X in chunks:
        runtime.predict(X)
    return len(frame) / (time.perf_counter() - started)


def scorer_in_process(store: ModelStore, model: str, source: Path, batch_rows: int) -> float:
    """Rows/s of one scoring actor's work (the codec's checks, predict_proba and labels, the
    output table) called in this process, without Ray: what a core can give ``serve-app score``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve_app import scoring

    meta = store.read_metadata(model)
    scorer = scoring._Scorer(store.uri, model, meta.version, ("predict", "predict_proba"), ["customer_id"],
                             [str(source)], "parquet", "fail", None)
    batches, offset = [], 0
    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows):
        rows = batch.num_rows
        batches.append(pa.Table.from_batches([batch])
                       .append_column(scoring.FILE_COLUMN, pa.array(np.zeros(rows, np.int32)))
                       .append_column(scoring.ROW_COLUMN, pa.array(np.arange(offset, offset + rows))))
        offset += rows
    started = time.perf_counter()
    for batch in batches:
        scorer(batch)
    return offset / (time.perf_counter() - started)


@contextmanager
def local_ray(work: Path, head_cpus: int, workers: int = 0, worker_cpus: int = 1) -> Iterator[tuple[str, float]]:
    """A local Ray of its own temp dir: a head with ``head_cpus`` and ``workers`` worker nodes;
    yields its address and the seconds ``ray start`` took. Stopped through its temp dir only."""
    ensure_ray_token(BIN / "ray")
    os.environ["RAY_AUTH_MODE"] = "token"  # the driver too: score() attaches to this cluster
    temp = Path(tempfile.mkdtemp(prefix="ray-batch-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    gcs = f"127.0.0.1:{free_port()}"
    log = open(work / f"{temp.name}.log", "w")
    started = time.perf_counter()
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs.split(':')[1]}",
                        f"--num-cpus={head_cpus}", f"--temp-dir={temp}", "--include-dashboard=false",
                        "--disable-usage-stats"], env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        for _ in range(workers):
            subprocess.run([str(BIN / "ray"), "start", f"--address={gcs}", "--node-ip-address=127.0.0.1",
                            f"--num-cpus={worker_cpus}", "--disable-usage-stats"],
                           env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        yield gcs, time.perf_counter() - started
    except subprocess.CalledProcessError:
        log.flush()
        print((work / f"{temp.name}.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        stop_ray_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
        log.close()


def score_cell(store: ModelStore, model: str, sources: tuple[Path, Path], out: Path, address: str,
               batch_rows: int) -> dict:
    """serve_app.scoring.score attached to ``address`` on the whole table, then on one of half its rows:
    rows/s of the whole run (start-up of the cluster and the connection excluded) and, from the
    difference, the steady rate and the run's fixed cost (the scoring actors' start and model
    load, the pipeline's fill and drain)."""
    import ray
    import pyarrow.parquet as pq

    from serve_app import scoring

    runs = []
    try:
        for source in sources:
            summary = scoring.score(model, str(source), str(out), store=store.uri, address=address,
                                    batch_rows=batch_rows, outputs=("predict", "predict_proba"))
            assert summary.failed == 0, summary
            runs.append(summary)
    finally:
        ray.shutdown()
    whole, half = runs
    rows_half = pq.ParquetFile(sources[1]).metadata.num_rows
    # The slope is only a measurement when the half table took clearly less time: on two shared
    # cores one run's noise can exceed the other run's rows (an 8M-row round measured the half
    # table slower than the whole). Then there is none.
    extra_s = whole.seconds - half.seconds
    steady = (whole.rows - rows_half) / extra_s if extra_s > 0.2 * whole.seconds else None
    fixed = None if steady is None else whole.seconds - whole.rows / steady
    if fixed is not None and fixed < 0:  # a negative fixed cost: noise too
        steady = fixed = None
    return {"rows_per_s": whole.rows_per_second, "seconds": whole.seconds, "connect_s": whole.startup_seconds,
            "rows": whole.rows, "steady_rows_per_s": steady, "fixed_s": fixed}


def http_cells(store_path: Path, model: str, work: Path, connections: int, seconds: float) -> dict[str, float]:
    """Rows/s of 1-row and 1000-row V2 requests through `serve run` of the shipped config."""
    results = {}
    with launch.ray_cluster(True, work) as cluster, launch.serve_run(cluster, our_config(store_path),
                                                                       work / "serve.log") as url:
        for key in HTTP_WORKLOADS[model]:
            workload = WORKLOADS[key]
            request = request_for("ours", workload)
            script = loadgen.write_script(request, work, key)
            cell = loadgen.measure(url + request.path, script, connections, seconds, warmup_s=1.0)
            if cell["non_2xx"] or cell["socket_errors"]:
                raise RuntimeError(f"{key}: {cell}")
            results[f"http-{workload.rows}"] = cell["rps"] * workload.rows
    return results


def spread(values: list[float | None]) -> dict | None:
    """Median, min and max of the values measured (None: not measured in that round)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def slope_text(steady: float | None, fixed: float | None, per_core_limit: float | None = None) -> str:
    if steady is None:
        return " steady: not measurable (the half table took about as long)"
    per_core = f" ({steady / per_core_limit:.2f}x per core)" if per_core_limit else ""
    return f" steady {steady:,.0f} rows/s{per_core}, fixed {fixed:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="churn", choices=sorted(HTTP_WORKLOADS))
    parser.add_argument("--batch-rows", type=int, default=None, help="default: serve-app score's")
    parser.add_argument("--worker-cpus", type=int, default=1, help="CPUs of each worker node (a RayService worker's)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections of the HTTP cells")
    parser.add_argument("--http-seconds", type=float, default=8.0)
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP cells")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from serve_app.scoring import DEFAULT_BATCH_ROWS
    from serve_app.tools.train import ensure_models, train_model

    batch_rows = args.batch_rows or DEFAULT_BATCH_ROWS
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        store = ModelStore(str(work / "model_store"))
        train_model(args.model, store)
        if not args.no_http:
            ensure_models(store)  # every model the shipped config serves
        source, half = work / "table.parquet", work / "half.parquet"
        generate(source, args.model, args.rows)
        generate(half, args.model, args.rows // 2)
        samples: dict[str, list[dict]] = {}
        cores = os.cpu_count() or 1
        shapes = {"score, 1 node": (cores, 0), "score, 1 worker": (0, 1), "score, 2 workers": (0, 2)}
        for round_number in range(args.rounds):
            samples.setdefault("in-process", []).append({"rows_per_s": in_process(store, args.model, source, batch_rows)})
            samples.setdefault("scorer, no Ray", []).append(
                {"rows_per_s": scorer_in_process(store, args.model, source, batch_rows)})
            for name, (head_cpus, workers) in shapes.items():
                with local_ray(work, head_cpus, workers, args.worker_cpus) as (address, started_s):
                    cell = score_cell(store, args.model, (source, half), work / "out", address, batch_rows)
                samples.setdefault(name, []).append({**cell, "cluster_start_s": started_s})
                print(f"  {name}: {cell['rows_per_s']:,.0f} rows/s;{slope_text(cell['steady_rows_per_s'], cell['fixed_s'])}",
                      flush=True)
            if not args.no_http:
                for name, rate in http_cells(Path(store.uri), args.model, work, args.connections,
                                             args.http_seconds).items():
                    samples.setdefault(name, []).append({"rows_per_s": rate})
            print(f"round {round_number + 1}: " + ", ".join(
                f"{name} {cells[-1]['rows_per_s']:,.0f}" for name, cells in samples.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cells = {name: {"rows_per_s": spread([c["rows_per_s"] for c in values]),
                    **({"startup_s": spread([c["cluster_start_s"] + c["connect_s"] for c in values]),
                        "steady_rows_per_s": spread([c["steady_rows_per_s"] for c in values]),
                        "fixed_s": spread([c["fixed_s"] for c in values])}
                       if "connect_s" in values[0] else {})}
             for name, values in samples.items()}
    limit = cells["in-process"]["rows_per_s"]["median"]
    cpus = {"scorer, no Ray": 1, "score, 1 node": os.cpu_count() or 1, "score, 1 worker": args.worker_cpus,
            "score, 2 workers": 2 * args.worker_cpus}
    for name, cell in cells.items():
        cell["vs_in_process"] = cell["rows_per_s"]["median"] / limit
        if name in cpus:
            cell["per_core_vs_in_process"] = cell["vs_in_process"] / cpus[name]
    result = {"rows": args.rows, "rounds": args.rounds, "model": args.model, "batch_rows": batch_rows,
              "cores": os.cpu_count(), "worker_cpus": args.worker_cpus, "load_average": os.getloadavg()[0],
              "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.rows:,} rows of {args.model}, medians of {args.rounds} round(s) (min-max):")
    for name, cell in cells.items():
        rate = cell["rows_per_s"]
        extra = ""
        if "startup_s" in cell:
            steady, fixed = cell["steady_rows_per_s"], cell["fixed_s"]
            extra = f"  start-up {cell['startup_s']['median']:.1f} s;" + slope_text(
                steady and steady["median"], fixed and fixed["median"], limit * cpus[name])
        per_core = f", {cell['per_core_vs_in_process']:.2f}x per core" if "per_core_vs_in_process" in cell else ""
        print(f"  {name:18} {rate['median']:>12,.0f} rows/s ({rate['min']:,.0f}-{rate['max']:,.0f})  "
              f"{cell['vs_in_process']:.2f}x in-process{per_core}{extra}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
