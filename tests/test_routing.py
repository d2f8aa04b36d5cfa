"""The canary split and the shadow comparison, without a server: the split honours the
weights within statistical tolerance, is sticky per key, and every configured version is
validated before anything is deployed."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, ModelSpec, MultiplexSpec
from serve_app.serving.routing import BUCKETS, TrafficSplit, bucket_of
from serve_app.serving.shadow import same_answer


@pytest.mark.parametrize("weights", [{"1": 90, "2": 10}, {"1": 50, "2": 50}, {"a": 70, "b": 20, "c": 10},
                                     {"1": 99.5, "2": 0.5}])
def test_split_follows_the_weights(weights):
    split, n = TrafficSplit(weights), 40_000
    chosen = [split.choose(uuid.uuid4().hex) for _ in range(n)]
    for version, weight in weights.items():
        p = weight / 100
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(chosen.count(version) - n * p) < 4.5 * sd, (version, chosen.count(version))


def test_split_without_a_key_is_random_and_still_weighted():
    split, n = TrafficSplit({"1": 80, "2": 20}), 20_000
    share = sum(split.choose(None) == "2" for _ in range(n)) / n
    assert abs(share - 0.2) < 4.5 * (0.2 * 0.8 / n) ** 0.5


def test_split_is_sticky_and_the_same_in_every_process():
    split = TrafficSplit({"1": 50, "2": 50})
    for key in (uuid.uuid4().hex for _ in range(200)):
        assert len({split.choose(key) for _ in range(5)}) == 1
    # blake2b, not Python's salted hash(): a given id routes the same in every replica.
    keys = ["request-42", "a", uuid.uuid4().hex]
    code = f"from serve_app.serving.routing import bucket_of; print([bucket_of(k) for k in {keys!r}])"
    for seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert other.strip() == str([bucket_of(k) for k in keys])
    assert 0 <= bucket_of("") < BUCKETS and 0 <= bucket_of("\udcff") < BUCKETS


def test_zero_weight_versions_never_answer():
    split = TrafficSplit({"1": 100, "2": 0})
    assert {split.choose(uuid.uuid4().hex) for _ in range(2000)} == {"1"}


@pytest.mark.parametrize("spec, problem", [
    ({"traffic": {"1": 90, "2": 20}}, "sum to 110"),
    ({"traffic": {"1": 110, "2": -10}}, "negative"),
    ({"traffic": {"1": 90, "2": 10}, "shadow": "2"}, "cannot both"),
    ({"versions": ["../x"]}, "invalid model version"),
    ({"shadow": "a b"}, "invalid model version"),
])
def test_bad_version_settings_are_refused(spec, problem):
    with pytest.raises(ValidationError, match=problem):
        ModelSpec(name="iris", **spec)


def test_live_versions_and_per_version_specs():
    spec = ModelSpec(name="iris", version=1, versions=[4], traffic={1: 90, 2: 10}, shadow=3)
    assert spec.live_versions == ["1", "4", "2", "3"]
    one = spec.for_version("2")
    assert (one.version, one.traffic, one.shadow, one.versions) == ("2", {}, None, [])
    assert one.max_batch_size == spec.max_batch_size


def test_multiplex_settings():
    config = AppConfig(store="/tmp/x", models=[{"name": "iris"}], multiplexed={"models": ["a", "b"]})
    assert config.multiplexed.serves("a") and not config.multiplexed.serves("c")
    assert MultiplexSpec().serves("anything")
    with pytest.raises(ValidationError):
        MultiplexSpec(max_models_per_replica=0)


def test_shadow_comparison():
    outputs = ("predict", "predict_proba")
    a = {"predict": np.array([0, 1]), "predict_proba": np.array([[0.9, 0.1], [0.2, 0.8]])}
    assert same_answer(a, {"predict": np.array([0, 1]), "predict_proba": a["predict_proba"] + 1e-12}, outputs)
    assert not same_answer(a, {"predict": np.array([0, 0]), "predict_proba": a["predict_proba"]}, outputs)
    assert not same_answer(a, {"predict": np.array([0, 1]), "predict_proba": a["predict_proba"][:1]}, outputs)
    assert not same_answer(a, {"predict": np.array([0, 1]), "predict_proba": a["predict_proba"] + 0.01}, outputs)
    assert same_answer({"predict": np.array(["a", "b"])}, {"predict": np.array(["a", "b"])}, ("predict",))
