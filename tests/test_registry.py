"""ModelRegistry without Ray: real stores and real models loaded in this process. The
placement here runs every version in-process (the long tail too), which is exactly what the
registry may not tell apart from a deployment."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.config import AppConfig, ModelSpec, Rollout
from serve_app.errors import ModelNotFoundError
from serve_app.metadata import ModelMetadata
from serve_app.serving import registry as registry_module
from serve_app.serving.interface import ModelInput, Worker
from serve_app.serving.registry import ModelRegistry
from serve_app.serving.worker import ModelWorker, load_versions
from serve_app.store import ModelStore
from serve_app.tools.train import train_model


class InProcessPlacement:
    """Every version loaded here; counts what it opened."""

    def __init__(self, store: ModelStore):
        self.store, self.opened = store, []

    def declared(self, spec: ModelSpec) -> tuple[dict[str, Worker], str]:
        self.opened.append(spec.name)
        return load_versions(self.store, spec), "in-process"

    def tail(self, meta: ModelMetadata) -> Worker:
        self.opened.append(f"{meta.name}:{meta.version}")
        return ModelWorker.from_store(self.store, ModelSpec(name=meta.name, version=meta.version))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    train_model("iris", store, version="1")
    train_model("iris", store, version="2", C=0.01)
    train_model("diabetes", store, version="1")
    train_model("iris", store, version="1", save_as="tail-a")
    train_model("iris", store, version="2", save_as="tail-a", C=0.01)
    train_model("iris", store, version="1", save_as="tail-b")
    train_model("iris", store, version="1", save_as="tail-c")
    return store


def registry_for(store: ModelStore, models: list[dict], multiplexed: dict | None = None) -> ModelRegistry:
    args = {"store": store.uri, "train_if_missing": False, "models": models}
    if multiplexed is not None:
        args["multiplexed"] = multiplexed
    return ModelRegistry(AppConfig.model_validate(args), store, InProcessPlacement(store))


def run(coroutine):
    return asyncio.run(coroutine)


def test_declared_models_are_open_from_the_start(store):
    registry = registry_for(store, [{"name": "iris", "timeout_s": 7}, {"name": "diabetes"}])
    assert registry.hosted() == ["iris", "diabetes"]
    assert registry.known("iris").default.meta.version == "2"  # "latest"
    assert registry.timeout_for("iris") == 7 and registry.timeout_for("nope") is None
    worker = run(registry.for_inference("iris", None, None))
    assert worker is registry.known("iris").default and worker.meta.version == "2"
    with pytest.raises(ModelNotFoundError, match="not served"):
        run(registry.for_inference("tulip", None, None))
    assert registry.known("tulip") is None


def test_inference_follows_the_split_and_metadata_the_default(store):
    registry = registry_for(store, [{"name": "iris", "version": "1", "traffic": {"1": 50, "2": 50}}])
    picked = {run(registry.for_inference("iris", None, f"id-{i}")).meta.version for i in range(60)}
    assert picked == {"1", "2"}
    sticky = {run(registry.for_inference("iris", None, "one-id")).meta.version for _ in range(20)}
    assert len(sticky) == 1
    assert {run(registry.for_metadata("iris", None)).meta.version for _ in range(20)} == {"1"}
    assert run(registry.for_metadata("iris", "2")).meta.version == "2"
    assert run(registry.for_inference("iris", "2", "one-id")).meta.version == "2"
    with pytest.raises(ModelNotFoundError, match="no version '3'"):
        run(registry.for_metadata("iris", "3"))


def test_the_long_tail_opens_on_first_use_and_stays_open(store):
    registry = registry_for(store, [{"name": "iris"}], {"models": ["*"]})
    placement = registry._placement
    assert registry.known("tail-a") is None
    worker = run(registry.for_inference("tail-a", None, None))
    served = registry.known("tail-a")
    assert served.serving == "multiplexed" and worker.meta.version == "2"
    assert run(registry.for_inference("tail-a", None, None)) is worker and registry.known("tail-a") is served
    assert placement.opened.count("tail-a:2") == 1
    # another stored version opens beside it
    assert run(registry.for_inference("tail-a", "1", None)).meta.version == "1"
    assert registry.hosted() == ["iris", "tail-a"]
    with pytest.raises(ModelNotFoundError, match="no version '9' in the store"):
        run(registry.for_inference("tail-a", "9", None))


def test_a_name_missing_from_the_store_is_not_looked_up_again_at_once(store, tmp_path, monkeypatch):
    own = ModelStore(str(tmp_path))
    train_model("iris", own, version="1")
    registry = registry_for(own, [{"name": "iris"}], {"models": ["*"]})
    with pytest.raises(ModelNotFoundError, match="not in the store"):
        run(registry.served("late"))
    train_model("iris", own, version="1", save_as="late")
    with pytest.raises(ModelNotFoundError, match="not served"):  # the negative cache answers
        run(registry.served("late"))
    monkeypatch.setattr(registry_module, "ABSENT_FOR_S", 0.0)
    registry._absent.clear()
    assert run(registry.served("late")).default.meta.name == "late"


def test_the_tail_keeps_a_bounded_number_of_entries(store, monkeypatch):
    monkeypatch.setattr(registry_module, "MAX_TAIL_ENTRIES", 2)
    registry = registry_for(store, [{"name": "iris"}], {"models": ["*"]})
    for name in ("tail-a", "tail-b", "tail-c"):
        run(registry.served(name))
    assert registry.hosted() == ["iris", "tail-b", "tail-c"]


def test_only_listed_names_are_multiplexed(store):
    registry = registry_for(store, [{"name": "iris"}], {"models": ["tail-b"]})
    assert run(registry.served("tail-b")).serving == "multiplexed"
    with pytest.raises(ModelNotFoundError):
        run(registry.served("tail-a"))


def test_reload_resolves_latest_again_and_swaps_the_workers(tmp_path):
    own = ModelStore(str(tmp_path))
    train_model("iris", own, version="1")
    registry = registry_for(own, [{"name": "iris", "timeout_s": 0.1}])
    before = registry.known("iris")
    train_model("iris", own, version="2", C=0.01)

    async def reload_and_predict():
        await registry.reload("iris")
        worker = await registry.for_inference("iris", None, None)
        answer = await worker.infer(iris_row(worker), ("predict",))
        await asyncio.sleep(1.3)  # the replaced workers close after the model's timeout
        return answer

    answer = run(reload_and_predict())
    assert registry.known("iris") is not before and answer.version == "2"
    assert before.default._closed and not registry.known("iris").default._closed


def test_a_rollout_reopens_only_the_models_whose_spec_changed_and_a_bad_one_keeps_serving(store):
    registry = registry_for(store, [{"name": "iris", "version": "1"}, {"name": "diabetes"}])
    config, diabetes = registry.config, registry.known("diabetes")
    specs = Rollout.model_validate({"models": {"iris": {"version": "2", "max_batch_size": 8}}}).specs(config)
    assert run(registry.respecify(specs)) == {}
    iris = registry.known("iris")
    assert iris.default.meta.version == "2" and iris.default.spec.max_batch_size == 8
    assert registry.known("diabetes") is diabetes  # unchanged: not reopened

    batching = Rollout.model_validate({"models": {"iris": {"version": "2", "max_batch_size": 4,
                                                           "timeout_s": 9}}}).specs(config)
    assert run(registry.respecify(batching)) == {}
    assert registry.known("iris") is iris and iris.default.spec.max_batch_size == 4  # in place, not reopened
    assert registry.timeout_for("iris") == 9

    missing = Rollout.model_validate({"models": {"iris": {"version": "9"}}}).specs(config)
    errors = run(registry.respecify(missing))
    assert list(errors) == ["iris"] and "9" in errors["iris"]
    assert registry.known("iris") is iris  # still serving version 2
    with pytest.raises(Exception, match="9"):  # a reload tries the wanted spec again
        run(registry.reload("iris"))
    assert registry.known("iris") is iris

    run(registry.respecify(Rollout().specs(config)))  # the override removed: back to args' version 1
    assert registry.known("iris").default.meta.version == "1"


def test_a_reload_during_a_rollout_does_not_undo_it(store):
    registry = registry_for(store, [{"name": "iris", "version": "1"}])
    specs = Rollout.model_validate({"models": {"iris": {"version": "2"}}}).specs(registry.config)

    async def both():
        await asyncio.gather(registry.respecify(specs), registry.reload("iris"))

    run(both())
    assert registry.known("iris").default.meta.version == "2"


@pytest.mark.parametrize("user_config, message", [
    ({"models": {"tulip": {"version": "2"}}}, "not in args.models"),
    ({"models": {"diabetes": {"version": "2"}}}, "dedicated"),
    ({"models": {"iris": {"store": "/elsewhere"}}}, "cannot change without a restart"),
    ({"models": {"iris": {"traffic": {"1": 50, "2": 40}}}}, "sum to 90"),
    ({"models": {"iris": {"traffic": 5}}}, "a mapping of version to percent"),
    ({"models": {"iris": {"versions": 5}}}, "a list of versions"),
    ({"model": {}}, "Extra inputs"),
])
def test_a_rollout_that_cannot_apply_is_refused_with_the_reason(store, user_config, message):
    config = AppConfig.model_validate({"store": store.uri, "train_if_missing": False,
                                       "models": [{"name": "iris"}, {"name": "diabetes", "dedicated": True}]})
    with pytest.raises(ValueError, match=message):
        Rollout.model_validate(user_config).specs(config)


def iris_row(worker: Worker) -> ModelInput:
    return ModelInput(tuple(worker.meta.feature_names), np.array([[5.1, 3.5, 1.4, 0.2]]))


def test_unversioned_requests_are_mirrored_to_the_shadow_and_versioned_ones_not(store):
    registry = registry_for(store, [{"name": "iris", "version": "1", "shadow": "2"}])
    shadow = registry.known("iris").shadow
    calls = []
    predict = shadow.runtime.predict
    shadow.runtime.predict = lambda X: calls.append(len(X)) or predict(X)

    async def requests():
        unversioned = await registry.for_inference("iris", None, "any-id")
        served = await unversioned.infer(iris_row(unversioned), ("predict",))
        await asyncio.sleep(0.2)  # the mirror runs after the answer
        after_unversioned = len(calls)
        versioned = await registry.for_inference("iris", "1", None)
        await versioned.infer(iris_row(versioned), ("predict",))
        await unversioned.infer(iris_row(unversioned), ("contributions", "bias"))  # explanations: not mirrored
        await asyncio.sleep(0.2)
        return served, unversioned, after_unversioned

    served, unversioned, after_unversioned = run(requests())
    assert served.version == "1" and unversioned.meta.version == "1" and unversioned is not registry.known("iris").default
    assert after_unversioned == 1 and len(calls) == 1
    assert registry.workers() == [registry.known("iris").default, shadow]  # health checks see each model once


def test_reloading_a_tail_model_swaps_it_for_a_fresh_lookup(store):
    registry = registry_for(store, [{"name": "iris"}], {"models": ["*"]})
    first = run(registry.served("tail-b"))
    run(registry.reload("tail-b"))
    fresh = registry.known("tail-b")
    assert fresh is not None and fresh is not first and run(registry.served("tail-b")) is fresh


def test_the_index_lists_live_and_stored_versions(store):
    registry = registry_for(store, [{"name": "iris", "version": "1"}], {"models": ["tail-a"]})
    index = {(e["name"], e["version"]): e for e in run(registry.index())}
    assert index["iris", "1"]["state"] == "READY" and index["iris", "1"]["default"]
    assert index["iris", "2"] == {"name": "iris", "version": "2", "state": "UNAVAILABLE", "serving": None,
                                  "reason": "in the store, not configured"}
    assert index["tail-a", "1"]["serving"] == "multiplexed" and index["tail-a", "1"]["state"] == "UNAVAILABLE"
    assert index["diabetes", "1"]["reason"] == "in the store, not configured"
    # what a client can call: live models, and the tail's stored ones
    assert run(registry.names()) == ["iris", "tail-a"]
    run(registry.served("tail-a"))
    assert {(e["version"], e["state"]) for e in run(registry.index()) if e["name"] == "tail-a"} == {
        ("1", "UNAVAILABLE"), ("2", "READY")}


def test_health_checks_reach_every_loaded_worker(store):
    registry = registry_for(store, [{"name": "iris", "version": "1", "versions": ["2", "latest"]},
                                    {"name": "diabetes"}])
    workers = registry.workers()
    assert sorted((w.meta.name, w.meta.version) for w in workers) == [("diabetes", "1"), ("iris", "1"), ("iris", "2")]
    for worker in workers:
        run(worker.check())

