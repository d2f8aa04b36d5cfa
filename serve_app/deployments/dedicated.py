"""A model in a deployment of its own (``model-<name>``, for ``dedicated: true``), and the
ingress's proxy for it.

A dedicated model gets its own replicas, autoscaling and ``ray_actor_options``, for one
DeploymentHandle hop per request (docs/performance.md measures it). Batching settings come
from the model spec and can change through ``user_config`` without a restart.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import ModelSpec
from serve_app.deployments.handles import DEPLOYMENT_OPTIONS, remote_call
from serve_app.deployments.reloads import ReloadWatcher
from serve_app.metadata import ModelMetadata
from serve_app.runtimes import accepts_missing
from serve_app.serving.interface import Answer, ModelInput, Worker, close_later, distinct
from serve_app.serving.worker import ModelWorker, load_versions
from serve_app.store import ModelStore


@serve.deployment(name="DedicatedModel", **DEPLOYMENT_OPTIONS)
class DedicatedModel:
    """Every live version of one model, in each replica of its deployment."""

    def __init__(self, store_uri: str, spec: ModelSpec):
        self.store, self.spec = ModelStore(store_uri), spec
        self._set_workers(load_versions(self.store, spec))
        self._watcher = ReloadWatcher(lambda: [spec.name], self._reload)

    def _set_workers(self, workers: dict[str, ModelWorker]) -> None:
        self.workers, self._by_version = workers, {w.meta.version: w for w in workers.values()}

    async def _reload(self, _name: str) -> None:
        old = self.workers
        self._set_workers(await asyncio.to_thread(load_versions, self.store, self.spec))
        close_later(old.values(), self.spec.timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        self.spec = self.spec.model_copy(update=user_config)
        for worker in distinct(self.workers.values()):
            worker.reconfigure(worker.spec.model_copy(update=user_config))

    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...], label: str | None = None) -> Answer:
        """``label`` is the version the ingress chose. During a rollout an ingress with the new
        config can reach a replica with the old one (or the reverse): a label this replica does
        not have gets its default version, and the answer names the version that computed it."""
        self._watcher.start()
        worker = self.workers.get(label) or self._by_version.get(label) or self.workers[self.spec.version]
        return await worker.infer(inputs, outputs)

    async def check_health(self) -> None:
        self._watcher.start()
        for worker in distinct(self.workers.values()):
            await worker.check()


class DedicatedWorker(Worker):
    """One version of a dedicated model, seen from the ingress.

    The dedicated deployment can roll to another model version while this ingress lives on
    (a config change to ``model-<name>`` alone), and during the rollout old and new replicas
    answer side by side. Each answer names the version that computed it; when that is a
    version this proxy has not described yet, its metadata is read (once) and describes the
    model from then on, so requests are validated against the features of what now serves.
    """

    def __init__(self, meta: ModelMetadata, handle: DeploymentHandle, spec: ModelSpec, store: ModelStore,
                 label: str):
        self.meta, self.spec, self.accepts_missing = meta, spec, accepts_missing(meta)
        self._handle, self._store, self._label = handle, store, label
        self._metas = {meta.version: meta}

    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        answer = await remote_call(self._handle.infer.remote(inputs, outputs, self._label))
        if answer.version not in self._metas:
            self._metas[answer.version] = await asyncio.to_thread(
                self._store.read_metadata, self.meta.name, answer.version)
        self.meta = self._metas[answer.version]
        return answer

    async def check(self) -> None:
        """The deployment's own health checks watch its replicas."""

    def close(self) -> None:
        """Nothing is held here: the deployment owns the model."""


def dedicated_workers(store: ModelStore, spec: ModelSpec, handle: DeploymentHandle) -> dict[str, DedicatedWorker]:
    """A proxy for each live version label of a dedicated model."""
    return {label: DedicatedWorker(store.read_metadata(spec.name, label), handle, spec, store, label)
            for label in spec.live_versions}
