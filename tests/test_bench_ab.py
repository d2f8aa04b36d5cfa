"""bench/ab.py's summary of before/after rounds: medians, spread and ratios per cell (the
rounds themselves are real harness runs; here they are given)."""

from __future__ import annotations

from bench.ab import summarise


def cell(server, rps, p99=10.0, workload="xgb-1", concurrency=16):
    return {"server": server, "workload": workload, "concurrency": concurrency, "rps": rps, "p99_ms": p99}


def test_medians_spread_and_ratios_per_cell():
    rounds = {
        "before": [[cell("ours", 1000), cell("fastapi", 500)], [cell("ours", 1200), cell("fastapi", 600)],
                   [cell("ours", 900, 30), cell("fastapi", 450)]],
        "after": [[cell("ours", 1100), cell("fastapi", 550)], [cell("ours", 1300), cell("fastapi", 500)],
                  [cell("ours", 1000), cell("fastapi", 500)]],
    }
    rows, table = summarise(rounds)
    ours = next(r for r in rows if r["server"] == "ours")
    assert ours["before"]["rps_median"] == 1000 and (ours["before"]["rps_min"], ours["before"]["rps_max"]) == (900, 1200)
    assert ours["after"]["rps_median"] == 1100 and abs(ours["after_x_before"] - 1.1) < 1e-9
    assert ours["before"]["p99_ms_median"] == 10.0
    assert ours["before"]["x_fastapi_median"] == 2.0  # each round against its own FastAPI run
    assert ours["after"]["x_fastapi_median"] == 2.0   # 2.0, 2.6, 2.0
    fastapi = next(r for r in rows if r["server"] == "fastapi")
    assert fastapi["before"]["x_fastapi_median"] is None
    assert "| ours | xgb-1 | 16 | 1,000 (900-1,200) | 1,100 (1,000-1,300) | 1.10 |" in table
