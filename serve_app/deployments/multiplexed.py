"""The long tail: any stored model, loaded on first use into a replica of one shared
deployment (``multiplexed-models``), and the ingress's proxy for such a model.

Serve's model multiplexing routes a model id to a replica that already holds that model
where it can; a replica holding ``max_models_per_replica`` models evicts the least recently
used one (its memory, thread and metrics go with it). The model id is
``name:version:generation``: it names the exact version, and a reload (a new generation) makes
an id no replica has cached.

So a replica's memory is bounded by ``max_models_per_replica`` times its largest model, and the
largest is bounded by ``max_model_bytes``: the ingress's registry refuses a bigger model before
the call (Serve evicts a model before it loads the next one, so a refusal in the replica would
cost a loaded model), and the replica checks again before it loads.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import ModelSpec, MultiplexSpec
from serve_app.deployments.handles import DEPLOYMENT_OPTIONS, remote_call
from serve_app.metadata import ModelMetadata
from serve_app.runtimes import accepts_missing
from serve_app.serving.interface import Answer, ModelInput, Worker
from serve_app.serving.worker import ModelWorker
from serve_app.store import ModelStore


def multiplexed_model_id(name: str, version: str, generation: int) -> str:
    return f"{name}:{version}:{generation}"


def parse_multiplexed_model_id(model_id: str) -> tuple[str, str]:
    """The model name and version a model id names."""
    name, version, _generation = model_id.split(":")
    return name, version


@serve.deployment(name="MultiplexedModels", **DEPLOYMENT_OPTIONS)
class MultiplexedModels:
    """Each replica loads the models its requests name, up to ``max_models_per_replica``."""

    def __init__(self, store_uri: str, spec: MultiplexSpec):
        self.store, self.spec = ModelStore(store_uri), spec

        async def load(model_id: str) -> ModelWorker:  # a function: Serve keeps its cache on it
            name, version = parse_multiplexed_model_id(model_id)
            return await asyncio.to_thread(ModelWorker.from_store, self.store, self.spec.spec_for(name, version))

        self.get_model = serve.multiplexed(max_num_models_per_replica=spec.max_models_per_replica)(load)

    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        worker = await self.get_model(serve.get_multiplexed_model_id())
        return await worker.infer(inputs, outputs)


class MultiplexedWorker(Worker):
    """One version of a long-tail model, seen from the ingress."""

    def __init__(self, meta: ModelMetadata, handle: DeploymentHandle, spec: ModelSpec, generation: int):
        self.meta, self.spec, self.accepts_missing = meta, spec, accepts_missing(meta)
        self.model_id = multiplexed_model_id(meta.name, meta.version, generation)
        self._handle = handle.options(multiplexed_model_id=self.model_id)

    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        return await remote_call(self._handle.infer.remote(inputs, outputs))

    async def check(self) -> None:
        """The deployment's own health checks watch its replicas."""

    def close(self) -> None:
        """Nothing is held here: a replica evicts the model when it needs the room."""
