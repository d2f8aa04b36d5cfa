"""Loading a model never runs code it carries: poisoned artifacts, registered in a real store
with a correct sha256 (so only the trust policy stands in the way), are refused through the
public loading path, and the file their payload would write never appears. Each payload is
first shown to be live (loaded without our policy, it does write its file), so a refusal is
what stopped it. A tampered artifact fails its sha256 check before any deserializer sees it.
"""

from __future__ import annotations

import io
import json
import pickle
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import skops.io as sio
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from conftest import FLEET
from serve_app.metadata import METADATA_FILE, Feature, MetadataError, ModelMetadata
from serve_app.runtimes import ArtifactError, load_runtime, runtime_for
from serve_app.runtimes.sklearn import SklearnRuntime, trusted_types
from serve_app.store import IntegrityError, InvalidMetadata, ModelStore
from serve_app.tools.train import train_model

TRUST_ENV = "SERVE_APP_SKOPS_TRUSTED_TYPES"


def payload_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('payload ran')"


class Trojan(BaseEstimator, TransformerMixin):
    """A pass-through pipeline step whose deserialisation writes a file: what a poisoned model
    file carries in a type that exists on the server but nobody audited."""

    def __init__(self, marker: str = ""):
        self.marker = marker

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X

    def __setstate__(self, state):
        Path(state["marker"]).write_text("payload ran")
        self.__dict__.update(state)


TROJAN = f"{Trojan.__module__}.{Trojan.__qualname__}"


class PickledPayload:
    """Pickles to ``exec(<code>)``: unpickling the bytes runs the code; no class needed then."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (payload_code(self.marker),)


def trojan_skops(marker: Path) -> bytes:
    """A working iris pipeline with a Trojan step in front of the classifier."""
    X, y = load_iris(return_X_y=True)
    return sio.dumps(make_pipeline(Trojan(str(marker)), LogisticRegression(max_iter=300)).fit(X, y))


def exec_gadget_skops(marker: Path) -> bytes:
    """A hand-made skops file whose root node calls ``builtins.exec(<code>)`` on load: skops
    rebuilds "constructor from reduce" nodes by calling the named callable with the stored args."""
    content = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps((payload_code(marker),)))).read("schema.json"))
    header = {key: content.pop(key) for key in ("protocol", "_skops_version")}
    root = {"__class__": "exec", "__module__": "builtins", "__loader__": "ConstructorFromReduceNode",
            "content": content, **header}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", json.dumps(root))
    return buffer.getvalue()


def register(store: ModelStore, name: str, artifact: bytes, framework: str = "sklearn",
             version: str = "1") -> ModelMetadata:
    """Saved as any model is: the store records the artifact's true sha256."""
    artifact_name = runtime_for(framework).artifact_name if framework in ("sklearn", "xgboost") else "model.pkl"
    meta = ModelMetadata(name=name, version=version, framework=framework, task="classification",
                         features=[Feature(f"f{i}") for i in range(4)], artifact=artifact_name, sha256="",
                         classes=[0, 1, 2])
    return store.save(meta, artifact)


def claim_trust(store: ModelStore, meta: ModelMetadata, **claims) -> None:
    """Rewrite a stored model.json with extra fields, as an attacker who can write the store would."""
    path = Path(store.uri) / meta.name / meta.version / METADATA_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **claims}))


@pytest.fixture(autouse=True)
def no_extra_trust(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture()
def store(tmp_path) -> ModelStore:
    return ModelStore(str(tmp_path / "store"))


# -- the payloads are live --------------------------------------------------------------------
def test_the_payloads_run_when_loaded_without_the_policy(tmp_path):
    """Control: skops told to trust the type, and plain pickle, do run each payload."""
    for name, load in [
        ("trojan", lambda m: sio.loads(trojan_skops(m), trusted=sio.get_untrusted_types(data=trojan_skops(m)))),
        ("gadget", lambda m: sio.loads(exec_gadget_skops(m), trusted=["builtins.exec"])),
        ("pickle", lambda m: pickle.loads(pickle.dumps(PickledPayload(m)))),
    ]:
        marker = tmp_path / f"{name}-ran"
        load(marker)
        assert marker.read_text() == "payload ran", name


# -- refused through the serving path -----------------------------------------------------------
def test_skops_file_with_an_untrusted_type_is_refused_unrun(store, tmp_path, monkeypatch):
    marker = tmp_path / "trojan-ran"
    artifact = trojan_skops(marker)
    assert TROJAN in sio.get_untrusted_types(data=artifact)
    register(store, "trojan", artifact)
    store.read_artifact(store.read_metadata("trojan"))  # its sha256 is right: only trust can stop it

    with pytest.raises(ArtifactError, match="untrusted types") as refused:
        load_runtime(store, "trojan")
    assert TROJAN in str(refused.value)
    assert not marker.exists()

    # An operator who audits and trusts the type gets a working model (and its side effect).
    monkeypatch.setenv(TRUST_ENV, TROJAN)
    runtime = load_runtime(store, "trojan")
    assert marker.exists()
    assert runtime.predict(load_iris().data[:1]).tolist() == [0]


def test_skops_exec_gadget_is_refused_unrun(store, tmp_path, monkeypatch):
    marker = tmp_path / "gadget-ran"
    register(store, "gadget", exec_gadget_skops(marker))
    monkeypatch.setenv(TRUST_ENV, TROJAN)  # trusting some other type does not let it through
    with pytest.raises(ArtifactError, match=r"untrusted types \['builtins.exec'\]"):
        load_runtime(store, "gadget")
    assert not marker.exists()


@pytest.mark.parametrize("framework", ["sklearn", "xgboost", "pickle"])
def test_raw_pickle_is_refused_unrun(store, tmp_path, framework):
    """A pickle in place of a skops/UBJSON artifact, or declared as a pickle: no runtime
    unpickles anything, whatever the metadata claims."""
    marker = tmp_path / "pickle-ran"
    register(store, "pickled", pickle.dumps(PickledPayload(marker)), framework)
    expected = "no runtime for framework 'pickle'" if framework == "pickle" else "not a readable"
    with pytest.raises(ArtifactError, match=expected):
        load_runtime(store, "pickled")
    assert not marker.exists()


# -- integrity ----------------------------------------------------------------------------------
def test_tampered_artifact_never_reaches_the_deserializer(store, tmp_path, monkeypatch):
    """The deserializer is set up to run the payload (its type trusted), yet a swapped or
    altered artifact is refused on its sha256 before any framework code reads it."""
    X, y = load_iris(return_X_y=True)
    meta = register(store, "iris", SklearnRuntime.serialize(LogisticRegression(max_iter=300).fit(X, y)))
    artifact_path = Path(store.uri) / "iris" / "1" / meta.artifact
    original = artifact_path.read_bytes()
    monkeypatch.setenv(TRUST_ENV, TROJAN)

    marker = tmp_path / "swapped-ran"
    artifact_path.write_bytes(trojan_skops(marker))
    with pytest.raises(IntegrityError, match="sha256") as refused:
        load_runtime(store, "iris")
    assert meta.sha256 in str(refused.value)
    assert not marker.exists()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    artifact_path.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match="sha256"):
        load_runtime(store, "iris")

    artifact_path.write_bytes(original)  # the recorded bytes load again
    np.testing.assert_array_equal(load_runtime(store, "iris").predict(X[:5]), [0] * 5)


# -- the trusted list is the server's alone ---------------------------------------------------------
def test_metadata_claiming_trusted_types_is_refused_unrun(store, tmp_path):
    """A model.json that approves its own artifact's types (MLflow's hole) is refused as a whole:
    the metadata schema is closed, so no stored field can widen what loads."""
    marker = tmp_path / "claimed-ran"
    meta = register(store, "claims", trojan_skops(marker))
    for claims in ({"trusted_types": [TROJAN]}, {"skops_trusted_types": TROJAN, "trusted": True}):
        claim_trust(store, meta, **claims)
        with pytest.raises(InvalidMetadata, match="unknown metadata fields") as refused:
            load_runtime(store, "claims")
        assert sorted(claims)[0] in str(refused.value)
    # ...and a claim tucked into a feature's description is refused the same way.
    claim_trust(store, meta, features=[{"name": "f0", "trusted_types": [TROJAN]}])
    with pytest.raises(InvalidMetadata, match="trusted_types"):
        store.read_metadata("claims")
    with pytest.raises(MetadataError, match="unknown metadata fields"):
        ModelMetadata.from_dict({**meta.to_dict(), "trusted_types": [TROJAN]})
    assert not marker.exists()


def test_no_place_beside_or_inside_the_artifact_widens_the_trusted_list(store, tmp_path):
    """Claims in a free-form field the schema has (``libraries``), in a file beside the model,
    and inside the skops archive itself: the runtime still refuses the type, and the trusted
    list is the same as before (built-in types plus SERVE_APP_SKOPS_TRUSTED_TYPES only)."""
    marker = tmp_path / "smuggled-ran"
    artifact = trojan_skops(marker)
    archive = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(artifact)) as original, zipfile.ZipFile(archive, "w") as smuggled:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "schema.json":
                data = json.dumps({**json.loads(data), "trusted": [TROJAN], "trusted_types": [TROJAN]}).encode()
            smuggled.writestr(item, data)
        smuggled.writestr("trusted_types.json", json.dumps([TROJAN]))
    before = trusted_types()
    for name, payload in (("in-metadata", artifact), ("in-archive", archive.getvalue())):
        meta = register(store, name, payload)
        claim_trust(store, meta, libraries={"skops": "0.13", "trusted_types": TROJAN})
        for sidecar in ("trusted_types.json", "trusted_types.txt", "skops_trusted_types"):
            (Path(store.uri) / name / "1" / sidecar).write_text(json.dumps([TROJAN]))
        with pytest.raises(ArtifactError, match="untrusted types") as refused:
            load_runtime(store, name)
        assert TROJAN in str(refused.value)
    assert trusted_types() == before and TROJAN not in before
    assert not marker.exists()


@pytest.mark.serve
def test_over_http_a_refused_model_is_a_409_and_latest_keeps_the_last_good_version(serve_cluster, tmp_path):
    """On the live cluster's long tail: a model whose metadata claims trusted types, and one whose
    artifact holds an untrusted type, answer 409 naming why and their payload never runs; a model
    whose newest versions are refused keeps answering from the last version that loads."""
    fleet = ModelStore(str(serve_cluster.store.parent / "fleet_store"))
    tag = uuid.uuid4().hex[:6]
    marker = tmp_path / "live-ran"
    claims = register(fleet, f"claims-{tag}", trojan_skops(marker))
    claim_trust(fleet, claims, trusted_types=[TROJAN])
    register(fleet, f"trojan-{tag}", trojan_skops(marker))
    fallback = f"fallback-{tag}"
    train_model("iris", fleet, version="1", save_as=fallback)
    register(fleet, fallback, trojan_skops(marker), version="2")
    body = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
    with httpx.Client(base_url=serve_cluster.url + FLEET, timeout=60) as http:
        for name, why in ((claims.name, "unknown metadata fields ['trusted_types']"),
                          (f"trojan-{tag}", f"untrusted types ['{TROJAN}']")):
            for path in (f"/v1/models/{name}:predict", f"/v1/models/{name}/versions/1:predict"):
                answer = http.post(path, json=body)
                assert answer.status_code == 409 and answer.json()["reason"] == "reload_failed", answer.text
                assert why in answer.json()["error"], answer.text
        served = http.post(f"/v1/models/{fallback}:predict", json=body)
        assert served.status_code == 200 and served.headers["x-model-version"] == "1", served.text
        assert served.json()["predictions"] == load_runtime(fleet, fallback, "1").predict(np.asarray(body["instances"])).tolist()
        refused = http.post(f"/v1/models/{fallback}/versions/2:predict", json=body)
        assert refused.status_code == 409 and "untrusted types" in refused.json()["error"], refused.text
        # A third version claiming trust for the second's type, then a reload: still version 1.
        claim_trust(fleet, register(fleet, fallback, trojan_skops(marker), version="3"), trusted_types=[TROJAN])
        assert http.post(f"/v2/repository/models/{fallback}/load").status_code == 200
        again = http.post(f"/v1/models/{fallback}:predict", json=body)
        assert again.status_code == 200 and again.headers["x-model-version"] == "1", again.text
    assert not marker.exists()
