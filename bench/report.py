"""Ratios, goals, the Markdown tables and the plot, all from the results JSON alone
(``python -m bench.report bench/results/bench.json`` redraws them).

Every figure is a median over the run's rounds; ratios and goals are computed from medians.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SERVER_TITLES = {"ours": "serve-app (shipped config)",
                 "serve-minimal": "minimal Ray Serve app (same fast path)",
                 "fastapi": "careful FastAPI, uvicorn workers = our replicas",
                 "fastapi-1": "careful FastAPI, 1 uvicorn worker",
                 "mlserver": "MLServer, parallel workers = our replicas"}
BASELINE = "fastapi"
COLOURS = {"ours": "tab:blue", "serve-minimal": "tab:purple", "fastapi": "tab:orange", "fastapi-1": "tab:olive",
           "mlserver": "tab:green"}
# (peer, target, what the target is): one-row req/s of ours against each peer at c >= 16
THROUGHPUT_GOALS = (("serve-minimal", 1.0, "first milestone"), ("fastapi", 1.0, "goal"),
                    ("fastapi", 1.2, "stretch"), ("mlserver", 1.5, "goal"))
P50_GOAL = 1.5  # c=1 p50 of ours against the FastAPI baseline's
BINARY_GOAL = 0.5  # 1000-row binary rows/s against in-process
IDLE_RSS_GOAL_MB = 2560


def cell_index(cells: list[dict]) -> dict[tuple, dict]:
    return {(c["server"], c["workload"], c["concurrency"]): c for c in cells}


def add_ratios(results: dict) -> None:
    """Each cell's throughput and p99 against the FastAPI cell of the same workload and
    concurrency; each cell's rows/s against the in-process rows/s."""
    index = cell_index(results["cells"])
    limits = results["in_process"]
    for cell in results["cells"]:
        base = index.get((BASELINE, cell["workload"], cell["concurrency"]))
        if base and base["rps"] > 0:
            cell["x_fastapi"] = round(cell["rps"] / base["rps"], 2)
            cell["p99_x_fastapi"] = round(cell["p99_ms"] / base["p99_ms"], 2) if base["p99_ms"] else None
        limit = limits.get(cell["workload"])
        if limit:
            cell["x_in_process"] = round(cell["rows_per_s"] / limit["rows_per_s"], 3)


def goals(results: dict) -> list[dict]:
    """The issue's goals, from the medians, each checked wherever it applies."""
    index = cell_index(results["cells"])
    checks = []

    def check(goal: str, workload: str, c: int | None, value: float, target: float, higher_is_better=True):
        met = value >= target if higher_is_better else value <= target
        checks.append({"goal": goal, "workload": workload, "concurrency": c, "value": round(value, 2),
                       "target": target, "met": met})

    for cell in results["cells"]:
        if cell["server"] != "ours":
            continue
        w, c = cell["workload"], cell["concurrency"]
        if cell["rows"] == 1 and c >= 16:
            for peer, target, kind in THROUGHPUT_GOALS:
                other = index.get((peer, w, c))
                if other and other["rps"] > 0:
                    check(f"req/s >= {target}x {peer} ({kind})", w, c, cell["rps"] / other["rps"], target)
        if cell["rows"] == 1 and c == 1:
            base = index.get((BASELINE, w, c))
            if base and base["p50_ms"] > 0:
                check(f"c=1 p50 <= {P50_GOAL}x fastapi", w, c, cell["p50_ms"] / base["p50_ms"], P50_GOAL, False)
        if cell["rows"] > 1 and w.endswith("binary") and "x_in_process" in cell:
            check(f"rows/s >= {BINARY_GOAL}x in-process", w, c, cell["x_in_process"], BINARY_GOAL)
    idle = results.get("memory", {}).get("ours")
    if idle and idle.get("rss_mb"):
        check(f"idle RSS <= {IDLE_RSS_GOAL_MB} MB", "idle", None, idle["rss_mb"], IDLE_RSS_GOAL_MB, False)
    return checks


def _fmt(value, digits=0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _servers(results: dict) -> list[str]:
    return [s for s in SERVER_TITLES if any(c["server"] == s for c in results["cells"])]


def peers_table(results: dict) -> list[str]:
    """What each server is, how many processes serve requests, and what it holds idle."""
    memory = results.get("memory", {})
    lines = ["| server | what | workers | processes | idle RSS MB | idle PSS MB |", "|---|---|---|---|---|---|"]
    for server in _servers(results):
        m = memory.get(server, {})
        lines.append(f"| `{server}` | {SERVER_TITLES[server]} | {_fmt(m.get('workers'))} | "
                     f"{_fmt(m.get('processes'))} | {_fmt(m.get('rss_mb'))} | {_fmt(m.get('pss_mb'))} |")
    return lines


def summary(results: dict) -> list[str]:
    """One row per workload and concurrency: each server's median throughput (min-max), and
    ours against each of the others. Batch workloads count rows/s."""
    index = cell_index(results["cells"])
    servers = _servers(results)
    others = [s for s in servers if s != "ours"]
    head = ["workload", "c"] + [f"{s} req/s (min-max)" for s in servers] + [f"ours x {s}" for s in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    workloads = list(dict.fromkeys(c["workload"] for c in results["cells"]))
    for workload in workloads:
        for c in sorted({cell["concurrency"] for cell in results["cells"] if cell["workload"] == workload}):
            row = [workload, str(c)]
            for server in servers:
                cell = index.get((server, workload, c))
                row.append(f"{cell['rps']:,.0f} ({cell['rps_min']:,.0f}-{cell['rps_max']:,.0f})" if cell else "—")
            ours = index.get(("ours", workload, c))
            for server in others:
                other = index.get((server, workload, c))
                row.append(f"{ours['rps'] / other['rps']:.2f}" if ours and other and other["rps"] else "—")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def cpu_table(results: dict, workload: str = "xgb-1", concurrency: int = 16, top: int = 6) -> list[str]:
    """CPU microseconds per request by process kind, per server, in one cell."""
    lines = []
    for server in _servers(results):
        cell = cell_index(results["cells"]).get((server, workload, concurrency))
        if not cell or not cell.get("cpu_us_per_request"):
            continue
        kinds = list(cell["cpu_us_per_request"].items())
        total = sum(us for _, us in kinds)
        shown = ", ".join(f"{kind} {us:,.0f}" for kind, us in kinds[:top])
        lines.append(f"| `{server}` | {total:,.0f} | {shown} |")
    if lines:
        lines = [f"| server | CPU µs per request, all | largest parts ({workload}, c={concurrency}) |",
                 "|---|---|---|"] + lines
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Run {meta['started']}: {meta.get('rounds', 1)} alternating rounds, {meta['duration_s']} s per cell "
             f"after {meta['warmup_s']} s of warm-up, wrk, load average {meta['load_before'][0]:.1f} before / "
             f"{meta['load_after'][0]:.1f} after ({meta['cores']} cores); our ingress runs "
             f"{meta.get('ingress_replicas', '?')} replicas idle, every peer as many workers.", ""]
    lines += peers_table(results) + [""]
    lines += summary(results)
    if results.get("goals"):
        lines += ["", "Goals (medians of this run):", "", "| goal | workload | c | value | met |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['workload']} | {_fmt(g['concurrency'])} | {g['value']} | "
                  f"{'yes' if g['met'] else '**no**'} |" for g in results["goals"]]
    loaded = results.get("loaded_memory")
    if loaded:
        idle, tail = loaded["idle"], loaded["with_tail_models"]
        lines += ["", f"Our memory, idle and with {loaded['tail_models']} long-tail models loaded: "
                  f"{idle['processes']} processes, {idle['rss_mb']:,} MB RSS ({idle['pss_mb']:,} MB PSS); "
                  f"{tail['processes']} processes, {tail['rss_mb']:,} MB RSS ({tail['pss_mb']:,} MB PSS)."]
    cpu = cpu_table(results)
    if cpu:
        lines += ["", "Where the CPU goes (medians; wrk and the rest of the machine included):", ""] + cpu
    lines += ["", "Every cell (medians over the rounds):", "",
              "| workload | c | server | req/s | min-max | rows/s | p50 ms | p99 ms | x FastAPI | x in-process "
              "| workers | RSS MB loaded | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SERVER_TITLES)}
    workloads = list(dict.fromkeys(c["workload"] for c in results["cells"]))
    for cell in sorted(results["cells"], key=lambda c: (workloads.index(c["workload"]), c["concurrency"],
                                                          order.get(c["server"], 9))):
        errors = cell["non_2xx"] + cell["socket_errors"]
        lines.append(
            f"| {cell['workload']} | {cell['concurrency']} | {cell['server']} | {_fmt(cell['rps'])} | "
            f"{_fmt(cell['rps_min'])}-{_fmt(cell['rps_max'])} | {_fmt(cell['rows_per_s'])} | "
            f"{_fmt(cell['p50_ms'], 2)} | {_fmt(cell['p99_ms'], 1)} | {_fmt(cell.get('x_fastapi'), 2)} | "
            f"{_fmt(cell.get('x_in_process'), 2)} | {','.join(map(str, cell['workers']))} | "
            f"{_fmt(cell.get('rss_mb_under_load'))} | {errors} |")
    lines += ["", "In-process limits (the model called in a loop, one thread, no server):", "",
              "| workload | calls/s | rows/s |", "|---|---|---|"]
    lines += [f"| {w} | {_fmt(lim['calls_per_s'])} | {_fmt(lim['rows_per_s'])} |"
              for w, lim in results["in_process"].items()]
    if results.get("levers"):
        lines += ["", "Levers (our server, one change each, one round, against the shipped median):", "",
                  "| lever | workload | c | req/s | p50 ms | p99 ms | x shipped |", "|---|---|---|---|---|---|---|"]
        shipped = {(c["workload"], c["concurrency"]): c for c in results["cells"] if c["server"] == "ours"}
        for lever in results["levers"]:
            base = shipped.get((lever["workload"], lever["concurrency"]))
            ratio = lever["rps"] / base["rps"] if base and base["rps"] else None
            lines.append(f"| {lever['lever']} | {lever['workload']} | {lever['concurrency']} | "
                         f"{_fmt(lever['rps'])} | {_fmt(lever['p50_ms'], 2)} | {_fmt(lever['p99_ms'], 1)} | "
                         f"{_fmt(ratio, 2)} |")
    beside = [c for c in results["cells"] if c.get("rounds_beside_other_ray")]
    if beside:
        lines += ["", "Measured while another Ray ran on the machine (rounds of the cell): " + ", ".join(
            f"{c['server']} {c['workload']} c={c['concurrency']} ({c['rounds_beside_other_ray']})" for c in beside)]
    if results.get("failures"):
        lines += ["", "Failed during the run: " + "; ".join(f"{f['lever']}: {f['error']}" for f in results["failures"])]
    if results.get("codecs"):
        lines += ["", "Decoding one 1000-row request (µs, in-process):", "", "| way | µs |", "|---|---|"]
        lines += [f"| {way} | {_fmt(us)} |" for way, us in results["codecs"].items()]
    for model, by_rows in (results.get("table_codecs") or {}).items():
        lines += ["", f"A mixed-type request ({model}, per-column V2 JSON) to the model's frame, and the model "
                  "(µs, in-process):", "", "| way | " + " | ".join(f"{r} rows" for r in by_rows) + " |",
                  "|---|" + "---|" * len(by_rows)]
        ways = list(dict.fromkeys(w for costs in by_rows.values() for w in costs))
        lines += [f"| {way} | " + " | ".join(_fmt(costs.get(way)) for costs in by_rows.values()) + " |"
                  for way in ways]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One row per workload: throughput (requests/s, or rows/s for batches), p50, p99, grouped
    by concurrency, one colour per server; the in-process limit as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    servers = [s for s in SERVER_TITLES if any(c["server"] == s for c in cells)]
    concurrencies = sorted({c["concurrency"] for c in cells})
    index = cell_index(cells)
    fig, axes = plt.subplots(len(workloads), 3, figsize=(15, 3.6 * len(workloads)), squeeze=False)
    width = 0.8 / max(1, len(servers))
    for row, workload in enumerate(workloads):
        batch = any(c["rows"] > 1 for c in cells if c["workload"] == workload)
        metric = ("rows_per_s", "rows/s") if batch else ("rps", "requests/s")
        for col, (key, label) in enumerate((metric, ("p50_ms", "p50 latency (ms)"), ("p99_ms", "p99 latency (ms)"))):
            ax = axes[row][col]
            for i, server in enumerate(servers):
                xs, ys, spread = [], [], [[], []]
                for j, c in enumerate(concurrencies):
                    cell = index.get((server, workload, c))
                    if cell:
                        xs.append(j + (i - (len(servers) - 1) / 2) * width)
                        ys.append(cell[key])
                        scale = cell[key] / cell["rps"] if col == 0 and cell["rps"] else 0.0
                        spread[0].append(cell[key] - cell["rps_min"] * scale)  # min-max of the rounds
                        spread[1].append(cell["rps_max"] * scale - cell[key])
                if xs:  # a server without this workload gets no bar and no legend entry
                    ax.bar(xs, ys, width, label=SERVER_TITLES[server], color=COLOURS[server],
                           yerr=spread if col == 0 else None, capsize=2)
            if col > 0:
                ax.set_yscale("log")  # c=1 sub-millisecond beside c=64 tens of milliseconds
            ax.set_xticks(range(len(concurrencies)), [f"c={c}" for c in concurrencies])
            ax.set_title(f"{workload}: {label}", fontsize=10)
            if col == 0 and batch and workload in results["in_process"]:
                ax.axhline(results["in_process"][workload]["rows_per_s"], color="k", ls="--", lw=1,
                           label="in-process limit")
            if col == 0 and row == 0:
                ax.legend(fontsize=8)
            elif col == 0 and batch:
                ax.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"{meta['started']}, {meta['cores']} cores, medians of {meta.get('rounds', 1)} rounds "
                 f"(bars: min-max), {meta['duration_s']} s per cell, "
                 f"load average {meta['load_before'][0]:.1f}/{meta['load_after'][0]:.1f}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    add_ratios(results)
    results["goals"] = goals(results)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(markdown(results))
    plot(results, out / "bench.png")


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/bench.json")
    write(json.loads(source.read_text()), source.parent)
    print((source.parent / "bench.md").read_text())
