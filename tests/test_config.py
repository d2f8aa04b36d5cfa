"""AppConfig: the SERVE_APP_STORE override that lets one Serve config serve from the image's
baked-in store locally and in a pod, or from s3:// in the cluster, without editing the config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from serve_app.config import AccessLogSpec, AppConfig
from serve_app.store import STORE_ENV

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve_config.yaml"
ARGS = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]


def test_store_comes_from_the_config_without_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    config = AppConfig.model_validate(ARGS)
    assert ARGS["store"] == "./model_store"
    assert config.store == str(tmp_path / "model_store")


@pytest.mark.parametrize("override", ["s3://bucket/models/prod", "/home/ray/app/model_store"])
def test_override_replaces_the_store(monkeypatch, override):
    monkeypatch.setenv(STORE_ENV, override)
    config = AppConfig.model_validate(ARGS)
    assert config.store == override
    # Everything else in the args is untouched.
    assert [m.name for m in config.models] == [m["name"] for m in ARGS["models"]]
    assert config.max_request_bytes == ARGS["max_request_bytes"]


def test_override_is_pinned_like_a_configured_path(monkeypatch, tmp_path):
    """A relative override resolves once, where it is read: replicas do not share a cwd."""
    monkeypatch.setenv(STORE_ENV, "relative/store")
    monkeypatch.chdir(tmp_path)
    assert AppConfig.model_validate(ARGS).store == os.path.join(tmp_path, "relative/store")


def test_empty_override_is_no_override(monkeypatch):
    monkeypatch.setenv(STORE_ENV, "  ")
    assert AppConfig.model_validate({**ARGS, "store": "s3://configured/one"}).store == "s3://configured/one"


def test_override_survives_the_round_trip_to_replicas(monkeypatch):
    """build_app hands replicas ``config.model_dump()``; validating it again keeps the store."""
    monkeypatch.setenv(STORE_ENV, "s3://bucket/models")
    dumped = AppConfig.model_validate(ARGS).model_dump()
    monkeypatch.delenv(STORE_ENV)
    assert AppConfig.model_validate(dumped).store == "s3://bucket/models"


@pytest.mark.parametrize("status, seconds, traced, draw, logged", [
    (200, 0.001, False, 0.5, False),   # an ordinary success: only the sample can pick it
    (200, 0.001, False, 0.001, True),  # picked by the 1 % sample
    (200, 0.300, False, 0.5, True),    # slow (>= 250 ms)
    (200, 0.001, True, 0.5, True),     # the client marked it a sampled trace (traceparent)
    (404, 0.001, False, 0.5, True),    # every error
    (503, 0.001, False, 0.5, True),
])
def test_access_log_keeps_the_lines_worth_reading(status, seconds, traced, draw, logged):
    assert AccessLogSpec().wants(status, seconds, traced, draw) is logged


def test_access_log_rules_are_settings():
    everything = AccessLogSpec(sample_rate=1)
    assert everything.wants(200, 0.001, False, 0.999)
    quiet = AccessLogSpec(sample_rate=0, slow_ms=10_000, sampled_traces=False)
    assert not quiet.wants(200, 1.0, True, 0.0)
    assert quiet.wants(400, 0.001, False, 0.5)


@pytest.mark.parametrize("header, trace_id", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-03", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", None),  # not sampled
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # invalid all-zero id
    ("00-xyz-00f067aa0ba902b7-01", None), ("garbage", None), ("", None), (None, None),
    ("00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01", None),
])
def test_sampled_trace_id_reads_w3c_traceparent(header, trace_id):
    from serve_app.lifecycle import sampled_trace_id
    assert sampled_trace_id(header) == trace_id
