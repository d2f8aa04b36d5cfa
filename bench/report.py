"""Ratios, goals, the Markdown table and the plot, all from the results JSON alone
(``python -m bench.report bench/results/bench.json`` redraws them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SERVER_TITLES = {"ours": "serve-app (shipped config)", "fastapi": "FastAPI + uvicorn (hand-rolled)",
                 "mlserver": "MLServer (adaptive batching)", "ray-naive": "Ray Serve, tutorial style"}
BASELINE = "fastapi"
COLOURS = {"ours": "tab:blue", "fastapi": "tab:orange", "mlserver": "tab:green", "ray-naive": "tab:red"}


def cell_index(cells: list[dict]) -> dict[tuple, dict]:
    return {(c["server"], c["workload"], c["concurrency"]): c for c in cells}


def add_ratios(results: dict) -> None:
    """Each cell's throughput and p99 against the FastAPI cell of the same workload and
    concurrency; each batch cell's rows/s against the in-process rows/s."""
    index = cell_index(results["cells"])
    limits = {w: lim for w, lim in results["in_process"].items()}
    for cell in results["cells"]:
        base = index.get((BASELINE, cell["workload"], cell["concurrency"]))
        if base and base["rps"] > 0:
            cell["x_fastapi"] = round(cell["rps"] / base["rps"], 2)
            cell["p99_x_fastapi"] = round(cell["p99_ms"] / base["p99_ms"], 2) if base["p99_ms"] else None
        limit = limits.get(cell["workload"])
        if limit:
            cell["x_in_process"] = round(cell["rows_per_s"] / limit["rows_per_s"], 3)


def goals(results: dict) -> list[dict]:
    """The issue's goals, each checked at every concurrency measured."""
    index = cell_index(results["cells"])
    checks = []

    def check(goal: str, workload: str, c: int, value: float | None, target: float, higher_is_better=True):
        if value is None:
            return
        met = value >= target if higher_is_better else value <= target
        checks.append({"goal": goal, "workload": workload, "concurrency": c, "value": round(value, 2),
                       "target": target, "met": met})

    for cell in results["cells"]:
        if cell["server"] != "ours":
            continue
        w, c = cell["workload"], cell["concurrency"]
        others = {s: index.get((s, w, c)) for s in ("fastapi", "mlserver", "ray-naive")}
        if cell["rows"] == 1:
            for server, target in (("fastapi", 1.2), ("mlserver", 1.5), ("ray-naive", 5.0)):
                other = others[server]
                if other and other["rps"] > 0:
                    check(f"req/s >= {target}x {server}", w, c, cell["rps"] / other["rps"], target)
            if others["fastapi"] and others["fastapi"]["p99_ms"] > 0:
                check("p99 <= 2x fastapi", w, c, cell["p99_ms"] / others["fastapi"]["p99_ms"], 2.0, False)
        elif "x_in_process" in cell:
            check("rows/s >= 0.7x in-process", w, c, cell["x_in_process"], 0.7)
    return checks


def _fmt(value, digits=0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def summary(results: dict) -> list[str]:
    """One row per workload and concurrency: each server's throughput (p99), and ours against
    each of the others. Batch workloads count rows/s, with the in-process limit beside them."""
    index = cell_index(results["cells"])
    servers = [s for s in SERVER_TITLES if any(c["server"] == s for c in results["cells"])]
    others = [s for s in servers if s != "ours"]
    head = (["workload", "c"] + [f"{s} req/s (p99 ms)" for s in servers]
            + [f"ours x {s}" for s in others] + ["ours x in-process"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    workloads = list(dict.fromkeys(c["workload"] for c in results["cells"]))
    for workload in workloads:
        for c in sorted({cell["concurrency"] for cell in results["cells"] if cell["workload"] == workload}):
            row = [workload, str(c)]
            for server in servers:
                cell = index.get((server, workload, c))
                row.append(f"{cell['rps']:,.0f} ({cell['p99_ms']:,.0f})" if cell else "—")
            ours = index.get(("ours", workload, c))
            for server in others:
                other = index.get((server, workload, c))
                row.append(f"{ours['rps'] / other['rps']:.2f}" if ours and other and other["rps"] else "—")
            row.append(_fmt(ours.get("x_in_process") if ours else None, 2))
            lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Run {meta['started']}: {meta['duration_s']} s per cell after {meta['warmup_s']} s of warm-up, "
             f"wrk, load average {meta['load_before'][0]:.1f} before / {meta['load_after'][0]:.1f} after "
             f"({meta['cores']} cores).", ""]
    lines += summary(results) + ["", "Every cell:", ""]
    lines += ["| workload | c | server | req/s | rows/s | p50 ms | p99 ms | x FastAPI | p99 x FastAPI "
              "| x in-process | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SERVER_TITLES)}
    workloads = list(dict.fromkeys(c["workload"] for c in results["cells"]))
    for cell in sorted(results["cells"], key=lambda c: (workloads.index(c["workload"]), c["concurrency"],
                                                          order.get(c["server"], 9))):
        errors = cell["non_2xx"] + cell["socket_errors"]
        lines.append(
            f"| {cell['workload']} | {cell['concurrency']} | {cell['server']} | {_fmt(cell['rps'])} | "
            f"{_fmt(cell['rows_per_s'])} | {_fmt(cell['p50_ms'], 1)} | {_fmt(cell['p99_ms'], 1)} | "
            f"{_fmt(cell.get('x_fastapi'), 2)} | {_fmt(cell.get('p99_x_fastapi'), 2)} | "
            f"{_fmt(cell.get('x_in_process'), 2)} | {errors} |")
    lines += ["", "In-process limits (the model called in a loop, one thread, no server):", "",
              "| workload | calls/s | rows/s |", "|---|---|---|"]
    lines += [f"| {w} | {_fmt(lim['calls_per_s'])} | {_fmt(lim['rows_per_s'])} |"
              for w, lim in results["in_process"].items()]
    if results.get("goals"):
        lines += ["", "Goals (ours against the others in this run):", "",
                  "| goal | workload | c | value | met |", "|---|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['workload']} | {g['concurrency']} | {g['value']} | "
                  f"{'yes' if g['met'] else '**no**'} |" for g in results["goals"]]
    if results.get("levers"):
        lines += ["", "Levers (our server, one change each against the shipped config, same run):", "",
                  "| lever | workload | c | req/s | p50 ms | p99 ms | x shipped |", "|---|---|---|---|---|---|---|"]
        shipped = {(c["workload"], c["concurrency"]): c for c in results["cells"] if c["server"] == "ours"}
        for lever in results["levers"]:
            base = shipped.get((lever["workload"], lever["concurrency"]))
            ratio = lever["rps"] / base["rps"] if base and base["rps"] else None
            lines.append(f"| {lever['lever']} | {lever['workload']} | {lever['concurrency']} | "
                         f"{_fmt(lever['rps'])} | {_fmt(lever['p50_ms'], 1)} | {_fmt(lever['p99_ms'], 1)} | "
                         f"{_fmt(ratio, 2)} |")
    if results.get("failures"):
        lines += ["", "Failed during the run: " + "; ".join(f"{f['lever']}: {f['error']}" for f in results["failures"])]
    if results.get("codecs"):
        lines += ["", "Decoding one 1000-row request (µs, in-process):", "", "| way | µs |", "|---|---|"]
        lines += [f"| {way} | {_fmt(us)} |" for way, us in results["codecs"].items()]
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
                xs, ys = [], []
                for j, c in enumerate(concurrencies):
                    cell = index.get((server, workload, c))
                    if cell:
                        xs.append(j + (i - (len(servers) - 1) / 2) * width)
                        ys.append(cell[key])
                if xs:  # a server without this workload gets no bar and no legend entry
                    ax.bar(xs, ys, width, label=SERVER_TITLES[server], color=COLOURS[server])
            if col > 0:
                ax.set_yscale("log")  # the naive app's seconds beside everyone's milliseconds
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
    fig.suptitle(f"{meta['started']}, {meta['cores']} cores, {meta['duration_s']} s per cell, "
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
