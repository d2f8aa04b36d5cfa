"""The soak harness (bench/soak.py, `make soak` runs it for 10 minutes) for 30 s against the
live cluster: no request may fail, no replica's or HAProxy's resident memory may grow by a
quarter, and their open file descriptors stay flat."""

from __future__ import annotations

import pytest

from bench.soak import FD_SLACK, plot, run_soak

pytestmark = [pytest.mark.serve, pytest.mark.slow]
# 30 s cannot tell a leak from a replica's first allocations after a busy suite (model-diabetes grew
# 15 % in one whole-suite CI run): the 10-minute `make soak` judges the 10 % goal; here a bound a
# per-request leak would still break.
SHORT_RUN_RSS_GROWTH = 0.25


def test_thirty_second_soak_has_no_errors_flat_memory_and_flat_fds(serve_cluster, tmp_path):
    result = run_soak(serve_cluster.url, [str(serve_cluster.ray_temp_dir)], duration_s=30, concurrency=4,
                      warmup_s=8, sample_s=3)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(f"\nsoak: {summary}")
    assert result["requests"] > 500, "the load generator did not run"
    assert result["errors"] == 0, result["error_samples"]
    assert result["replicas_measured"] >= 2 and result["haproxy_measured"] >= 1, summary
    assert all(s["p99_ms"] is not None for s in result["samples"]), "an interval without answers"
    for name, process in result["processes"].items():
        assert process["rss_growth"] < SHORT_RUN_RSS_GROWTH, (name, process)
        # From the middle of the run: a replica started late in a busy suite still opens its
        # connections to its peers in the first seconds (model-diabetes went 49 -> 66, its count
        # from the start when run alone). A leak of one fd per request would add thousands.
        assert process["fds_end"] <= process["fds_mid"] + FD_SLACK, (name, process)
    plot(result, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
