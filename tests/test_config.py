"""AppConfig: the SERVE_APP_STORE override that lets one Serve config serve from the image's
baked-in store locally and in a pod, or from s3:// in the cluster, without editing the config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from serve_app.config import STORE_OVERRIDE_ENV, AppConfig

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve_config.yaml"
ARGS = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]


def test_store_comes_from_the_config_without_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv(STORE_OVERRIDE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    config = AppConfig.model_validate(ARGS)
    assert ARGS["store"] == "./model_store"
    assert config.store == str(tmp_path / "model_store")


@pytest.mark.parametrize("override", ["s3://bucket/models/prod", "/home/ray/app/model_store"])
def test_override_replaces_the_store(monkeypatch, override):
    monkeypatch.setenv(STORE_OVERRIDE_ENV, override)
    config = AppConfig.model_validate(ARGS)
    assert config.store == override
    # Everything else in the args is untouched.
    assert [m.name for m in config.models] == [m["name"] for m in ARGS["models"]]
    assert config.max_request_bytes == ARGS["max_request_bytes"]


def test_override_is_pinned_like_a_configured_path(monkeypatch, tmp_path):
    """A relative override resolves once, where it is read: replicas do not share a cwd."""
    monkeypatch.setenv(STORE_OVERRIDE_ENV, "relative/store")
    monkeypatch.chdir(tmp_path)
    assert AppConfig.model_validate(ARGS).store == os.path.join(tmp_path, "relative/store")


def test_empty_override_is_no_override(monkeypatch):
    monkeypatch.setenv(STORE_OVERRIDE_ENV, "  ")
    assert AppConfig.model_validate({**ARGS, "store": "s3://configured/one"}).store == "s3://configured/one"


def test_override_survives_the_round_trip_to_replicas(monkeypatch):
    """build_app hands replicas ``config.model_dump()``; validating it again keeps the store."""
    monkeypatch.setenv(STORE_OVERRIDE_ENV, "s3://bucket/models")
    dumped = AppConfig.model_validate(ARGS).model_dump()
    monkeypatch.delenv(STORE_OVERRIDE_ENV)
    assert AppConfig.model_validate(dumped).store == "s3://bucket/models"
