"""Before and after: the benchmark of two checkouts, in alternating rounds on this machine.

    .venv/bin/python -m bench.ab --before ../before --after . --rounds 3 -- \\
        --servers ours,fastapi --workloads xgb-1,sklearn-1 --concurrency 16,64 --levers none

Each checkout runs its own ``bench.harness`` with its own ``.venv`` (the arguments after ``--``),
A, B, A, B, ...: slow drift of the machine (heat, a neighbour) falls on both sides alike. Per
cell the table gives each side's median requests/s with the spread of its rounds, the median
p99, and after/before; each round's ours/FastAPI ratio is also computed within its own run (a
peer measured minutes apart, under the same conditions) and its median reported. Results:
``ab.json`` and ``ab.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_round(checkout: Path, harness_args: list[str], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    command = [str(checkout / ".venv" / "bin" / "python"), "-m", "bench.harness", *harness_args, "--out", str(out)]
    print(f"$ (cd {checkout} && {' '.join(command)})", flush=True)
    subprocess.run(command, cwd=checkout, check=True)
    return json.loads((out / "bench.json").read_text())["cells"]


def key(cell: dict) -> tuple:
    return cell["server"], cell["workload"], cell["concurrency"]


def summarise(rounds: dict[str, list[list[dict]]]) -> tuple[list[dict], str]:
    """One row per (server, workload, concurrency) measured on both sides."""
    by_side = {side: [{key(c): c for c in cells} for cells in runs] for side, runs in rounds.items()}
    keys = sorted({k for runs in by_side.values() for cells in runs for k in cells})
    rows = []
    for k in keys:
        row = {"server": k[0], "workload": k[1], "concurrency": k[2]}
        for side, runs in by_side.items():
            rps = [cells[k]["rps"] for cells in runs if k in cells]
            p99 = [cells[k]["p99_ms"] for cells in runs if k in cells]
            peer = [cells[k]["rps"] / cells[("fastapi", *k[1:])]["rps"] for cells in runs
                    if k in cells and ("fastapi", *k[1:]) in cells and k[0] != "fastapi"]
            row[side] = {"rps_median": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
                         "p99_ms_median": statistics.median(p99), "rounds": len(rps),
                         "x_fastapi_median": statistics.median(peer) if peer else None}
        row["after_x_before"] = row["after"]["rps_median"] / row["before"]["rps_median"]
        rows.append(row)
    lines = ["| server | workload | c | before req/s (min-max) | after req/s (min-max) | after / before "
             "| p99 ms before / after | x FastAPI before / after |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b, a = row["before"], row["after"]
        peer = (f"{b['x_fastapi_median']:.2f} / {a['x_fastapi_median']:.2f}"
                if b["x_fastapi_median"] is not None and a["x_fastapi_median"] is not None else "-")
        lines.append(f"| {row['server']} | {row['workload']} | {row['concurrency']} "
                     f"| {b['rps_median']:,.0f} ({b['rps_min']:,.0f}-{b['rps_max']:,.0f}) "
                     f"| {a['rps_median']:,.0f} ({a['rps_min']:,.0f}-{a['rps_max']:,.0f}) "
                     f"| {row['after_x_before']:.2f} | {b['p99_ms_median']:.0f} / {a['p99_ms_median']:.0f} | {peer} |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, harness_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout measured first in each round")
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ab"))
    args = parser.parse_args(ours)
    rounds: dict[str, list[list[dict]]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for side in ("before", "after"):
            checkout = getattr(args, side).resolve()
            rounds[side].append(run_round(checkout, harness_args, args.out.resolve() / f"{side}-{i + 1}"))
    rows, table = summarise(rounds)
    (args.out / "ab.json").write_text(json.dumps({"harness_args": harness_args, "rounds": args.rounds,
                                                  "rows": rows}, indent=2))
    (args.out / "ab.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
