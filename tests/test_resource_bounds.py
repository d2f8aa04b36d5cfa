"""Resource bounds of the long tail, against the live cluster's ``fleet`` application
(conftest.fleet_app: one ``multiplexed-models`` replica holding FLEET_MAX_MODELS_PER_REPLICA
models, ``max_model_bytes`` FLEET_MAX_MODEL_BYTES): the replica's memory stays bounded while
more large models than it holds are called in turn, and a model over the bound is refused with
a clear 409 and never loaded. The first tests need no cluster: the bound's configuration, and a
declared model over its bound failing before its artifact is read."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
from sklearn.ensemble import ExtraTreesClassifier
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from conftest import FLEET, FLEET_MAX_MODEL_BYTES, FLEET_MAX_MODELS_PER_REPLICA, TAIL_MODELS
from serve_app.config import DEFAULT_MAX_MODEL_BYTES, AppConfig, ModelSpec
from serve_app.errors import ModelTooLarge
from serve_app.publishing import publish
from serve_app.serving.worker import load_versions
from serve_app.store import ModelStore

LARGE = [f"large-{i:02d}" for i in range(10)]  # more than the replica holds: 2.5x
TOO_LARGE = "too-large"
ROWS = 20_000
# Rows sent per request; the models take 4 float features.
X = np.random.default_rng(1).normal(size=(8, 4))
# How far above cap x (one model's increase) the replica may go: a model's load holds its
# artifact bytes and skops' buffers for a moment, and the allocator keeps some freed pages.
MARGIN = 1.5


def fit_trees(n_trees: int) -> tuple[ExtraTreesClassifier, pd.DataFrame]:
    """A tree ensemble that is large for the time it takes to fit (under a second): random
    labels and one random split per node grow every tree to about one leaf per row, ~2.5 MB
    of artifact per tree. Deterministic: the same bytes every run."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(ROWS, 4)), columns=[f"f{i}" for i in range(4)])
    model = ExtraTreesClassifier(n_estimators=n_trees, max_features=1, random_state=0, n_jobs=1)
    return model.fit(frame.to_numpy(), rng.integers(0, 2, ROWS)), frame


def v2_body(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}],
            "outputs": [{"name": "predict_proba"}]}


def predict_proba(answer: dict) -> np.ndarray:
    tensor = answer["outputs"][0]
    return np.asarray(tensor["data"]).reshape(tensor["shape"])


# -- the bound's configuration (no cluster) -------------------------------------------------
def test_the_application_bound_applies_to_every_model_without_its_own():
    config = AppConfig(store="/tmp/unused", models=[{"name": "a"}, {"name": "b", "max_model_bytes": 5}],
                       multiplexed={})
    assert [m.max_model_bytes for m in config.models] == [DEFAULT_MAX_MODEL_BYTES, 5]
    assert config.multiplexed.spec_for("tail", "1").max_model_bytes == DEFAULT_MAX_MODEL_BYTES
    # what the ingress gets (the dumped config, validated again) keeps every bound
    assert AppConfig.model_validate(config.model_dump()).models[1].max_model_bytes == 5
    tail_own = AppConfig(store="/tmp/unused", models=[{"name": "a"}], max_model_bytes=9,
                         multiplexed={"max_model_bytes": 7})
    assert (tail_own.models[0].max_model_bytes, tail_own.multiplexed.max_model_bytes) == (9, 7)
    with pytest.raises(ValueError):
        AppConfig(store="/tmp/unused", models=[{"name": "a"}], max_model_bytes=0)


def test_a_declared_model_over_its_bound_fails_before_its_artifact_is_read(tmp_path):
    """The check comes first: the artifact's bytes are damaged (reading them would fail the
    sha256 check), yet the error is the size, naming the size and the bound."""
    store = ModelStore(str(tmp_path))
    model, frame = fit_trees(1)
    meta = publish(model, "declared", frame.head(200), store=store, version="1")
    artifact = tmp_path / "declared" / "1" / meta.artifact
    size = artifact.stat().st_size
    assert load_versions(store, ModelSpec(name="declared", max_model_bytes=size))["latest"].meta.version == "1"
    artifact.write_bytes(b"\0" * size)
    with pytest.raises(ModelTooLarge) as refused:
        load_versions(store, ModelSpec(name="declared", max_model_bytes=size - 1))
    assert refused.value.status_code == 409 and refused.value.reason == "model_too_large"
    assert f"{size:,} bytes" in refused.value.message and f"{size - 1:,} bytes" in refused.value.message


def test_the_artifact_size_is_asked_of_the_store_without_reading_it(tmp_path, s3_bucket):
    """A local file's stat and an S3 object's HEAD (a real S3 API: the moto server), under a
    prefix; None for a version without an artifact (the read that follows reports it)."""
    _client, bucket = s3_bucket
    model, frame = fit_trees(1)
    for store in (ModelStore(str(tmp_path)), ModelStore(f"s3://{bucket}/some/prefix")):
        meta = publish(model, "sized", frame.head(200), store=store, version="1")
        assert store.artifact_size(meta) == len(store.read_artifact(meta)) > 0, store.uri
        assert store.artifact_size(dataclasses.replace(meta, version="2")) is None


# -- the live long tail ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url + FLEET, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def large_models(serve_cluster) -> ExtraTreesClassifier:
    """LARGE in the fleet's store (one fitted ensemble published once, stored under each name:
    each name is a model of its own to the server) and TOO_LARGE, twice its size."""
    store = ModelStore(str(serve_cluster.store.parent / "fleet_store"))
    model, frame = fit_trees(10)
    meta = publish(model, LARGE[0], frame.head(200), store=store, version="1")
    artifact = store.read_artifact(meta)
    assert 20 * 2**20 < len(artifact) < FLEET_MAX_MODEL_BYTES, len(artifact)
    for name in LARGE[1:]:
        store.save(dataclasses.replace(meta, name=name), artifact)
    too_large, _ = fit_trees(20)
    publish(too_large, TOO_LARGE, frame.head(200), store=store, version="1")
    return model


def multiplexed_replica(serve_cluster) -> psutil.Process:
    """The fleet's multiplexed-models replica: a worker process of this cluster's raylet (the
    one whose command line names the cluster's temp dir) titled with the deployment's name."""
    title, temp_dir = "ServeReplica:fleet:multiplexed-models", str(serve_cluster.ray_temp_dir)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(title in arg for arg in proc.info["cmdline"] or ()) and any(
                    temp_dir in arg for parent in proc.parents() for arg in parent.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    assert len(found) == 1, found
    return found[0]


class RssSampler:
    """The replica's resident set size every 20 ms while the ``with`` block runs: the peak
    includes each load's transient buffers, not only the settled state after a request."""

    def __init__(self, proc: psutil.Process):
        self.proc, self.peak = proc, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.serve
@pytest.mark.slow
def test_replica_memory_stays_bounded_by_max_models_per_replica(serve_cluster, fleet, large_models):
    """Ten large models called in turn on a replica that holds four: its memory grows by about
    four models' worth and stays there, far below the ten the round-robin loads."""
    cap, replica = FLEET_MAX_MODELS_PER_REPLICA, multiplexed_replica(serve_cluster)
    expected = large_models.predict_proba(X)

    def call(name: str) -> None:
        """Four requests at once: they meet in the model's batching queue (a lone request
        skips it), which must not keep the model alive after its eviction."""
        for answer in clients.map(lambda _: fleet.post(f"/v2/models/{name}/infer", json=v2_body(X)), range(4)):
            assert answer.status_code == 200, (name, answer.text)
            np.testing.assert_allclose(predict_proba(answer.json()), expected, rtol=1e-9)

    clients = ThreadPoolExecutor(4)

    for name in TAIL_MODELS[:cap]:  # the replica holds small models only: evicts earlier tests' ones
        assert fleet.post(f"/v2/models/{name}/infer", json=v2_body(X)).status_code == 200
    baseline = replica.memory_info().rss
    for name in LARGE[:cap]:
        call(name)
    per_model = (replica.memory_info().rss - baseline) / cap
    started = time.monotonic()
    with RssSampler(replica) as sampler:
        for _ in range(2):  # every call a miss: the round-robin always asks for the least recent
            for name in LARGE:
                call(name)
    took = time.monotonic() - started
    clients.shutdown()
    for name in TAIL_MODELS[:cap]:  # evicts every large model: what the allocator keeps of them
        assert fleet.post(f"/v2/models/{name}/infer", json=v2_body(X)).status_code == 200
    kept, grew, mb = replica.memory_info().rss - baseline, sampler.peak - baseline, 2**20
    print(f"\nreplica RSS: baseline {baseline / mb:.0f} MiB, one large model +{per_model / mb:.1f} MiB, "
          f"peak over {2 * len(LARGE)} loads of {len(LARGE)} models (cap {cap}) +{grew / mb:.0f} MiB "
          f"({grew / per_model:.1f} models' worth) in {took:.1f} s; all {len(LARGE)} at once would need "
          f"+{len(LARGE) * per_model / mb:.0f} MiB; after evicting them all +{kept / mb:.0f} MiB")
    assert per_model > 10 * mb, per_model  # the models are large enough to measure
    assert grew <= cap * per_model * MARGIN, (grew / mb, per_model / mb)
    assert grew < 0.65 * len(LARGE) * per_model, (grew / mb, per_model / mb)


@pytest.mark.serve
@pytest.mark.slow
def test_a_model_over_max_model_bytes_is_refused_clearly_and_the_replica_serves_on(
        serve_cluster, fleet, large_models):
    for _ in range(2):  # the second refusal comes from the ingress's cached size
        refused = fleet.post(f"/v2/models/{TOO_LARGE}/infer", json=v2_body(X))
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["reason"] == "model_too_large"
        assert f"max_model_bytes of {FLEET_MAX_MODEL_BYTES:,} bytes" in body["error"], body
        assert TOO_LARGE in body["error"] and "MiB" in body["error"]
    v1 = fleet.post(f"/v1/models/{TOO_LARGE}/versions/1:predict", json={"instances": X.tolist()})
    assert v1.status_code == 409 and v1.json()["reason"] == "model_too_large", v1.text
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        request = pb.ModelInferRequest(model_name=TOO_LARGE, raw_input_contents=[X.astype("<f8").tobytes()])
        request.inputs.add(name="x", datatype="FP64", shape=list(X.shape))
        with pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=(("application", "fleet"),))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert dict(caught.value.trailing_metadata() or ()).get("reason") == "model_too_large"
    # not served, so not described as a live model either (the same refusal: the registry checks the
    # size before anything is read); the replica goes on serving the others
    described = fleet.get(f"/v2/models/{TOO_LARGE}")
    assert described.status_code == 409 and described.json()["reason"] == "model_too_large", described.text
    served = fleet.post(f"/v2/models/{LARGE[0]}/infer", json=v2_body(X))
    assert served.status_code == 200, served.text
    np.testing.assert_allclose(predict_proba(served.json()), large_models.predict_proba(X), rtol=1e-9)
