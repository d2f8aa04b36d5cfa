"""The soak harness (bench/soak.py, `make soak` runs it for 10 minutes) for 30 s against the
live cluster: no request may fail and the replicas' resident memory may not grow by 10 %."""

from __future__ import annotations

import pytest

from bench.soak import run_soak

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_thirty_second_soak_has_no_errors_and_flat_memory(serve_cluster):
    result = run_soak(serve_cluster.url, str(serve_cluster.ray_temp_dir), duration_s=30, concurrency=4,
                      warmup_s=8)
    print(f"\nsoak: {result}")
    assert result["requests"] > 500, "the load generator did not run"
    assert result["errors"] == 0, result["error_samples"]
    assert result["replicas_measured"] >= 2
    assert result["rss_growth"] < 0.10, result
