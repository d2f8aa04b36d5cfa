"""Where each model version runs, as the ingress opens it: loaded in the ingress replica,
behind its dedicated deployment, or in the shared multiplexed deployment.

:class:`serve_app.serving.registry.ModelRegistry` asks this object for workers and never
learns which kind it got: every kind implements :class:`serve_app.serving.interface.Worker`.
"""

from __future__ import annotations

from typing import Callable

from ray.serve.handle import DeploymentHandle

from serve_app.config import ModelSpec, MultiplexSpec
from serve_app.deployments.dedicated import dedicated_workers
from serve_app.deployments.multiplexed import MultiplexedWorker
from serve_app.metadata import ModelMetadata
from serve_app.serving.interface import Worker
from serve_app.serving.worker import load_versions
from serve_app.store import ModelStore


class DeploymentPlacement:
    """Declared models in this replica unless ``dedicated``; the long tail multiplexed.

    ``generation(name)`` is the model's reload generation (part of a long-tail model's id)."""

    def __init__(self, store: ModelStore, dedicated: dict[str, DeploymentHandle],
                 multiplexed: DeploymentHandle | None, tail_spec: MultiplexSpec | None,
                 generation: Callable[[str], int]):
        self._store, self._dedicated, self._multiplexed = store, dedicated, multiplexed
        self._tail_spec, self._generation = tail_spec, generation

    def declared(self, spec: ModelSpec) -> tuple[dict[str, Worker], str]:
        """A worker per live version label, and how the model is served."""
        if spec.dedicated:
            return dedicated_workers(self._store, spec, self._dedicated[spec.name]), "dedicated"
        return load_versions(self._store, spec), "in-process"

    def tail(self, meta: ModelMetadata) -> Worker:
        return MultiplexedWorker(meta, self._multiplexed, self._tail_spec.spec_for(meta.name, meta.version),
                                 self._generation(meta.name))
