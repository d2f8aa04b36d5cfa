"""One model name as the ingress serves it: its live versions, the canary split, the shadow.

A :class:`ServedModel` does not care where a version runs: each version is a
:class:`~serve_app.serving.interface.Worker`.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Mapping

from serve_app.config import ModelSpec
from serve_app.errors import ModelNotFoundError
from serve_app.serving.interface import Worker, distinct
from serve_app.serving.routing import TrafficSplit
from serve_app.serving.shadow import Shadow, ShadowedWorker


class ServedModel:
    """The live versions of one model and which of them answers a request.

    ``workers`` maps each configured version label (``"latest"``, ``"2"``) to its worker; the
    paths address versions by their real number. ``open_version``, when given, loads a version
    that is not live on first use (the multiplexed long tail can address any stored version).
    """

    def __init__(self, name: str, workers: Mapping[str, Worker], default: str,
                 traffic: Mapping[str, float] | None = None, shadow: str | None = None,
                 serving: str = "in-process",
                 open_version: Callable[[str], Awaitable[Worker]] | None = None):
        self.name, self.serving = name, serving
        self.default = workers[default]
        self.by_version: dict[str, Worker] = {}
        for worker in workers.values():
            self.by_version.setdefault(worker.meta.version, worker)
        weights: dict[str, float] = {}
        for label, weight in (traffic or {}).items():
            version = workers[label].meta.version
            weights[version] = weights.get(version, 0.0) + weight
        self.weights = weights
        self.split = TrafficSplit(weights) if weights else None
        self.shadow = workers[shadow] if shadow else None
        # What answers an unversioned request: the default or the split's version, mirrored to
        # the shadow if there is one (requests naming a version are not mirrored).
        mirror = Shadow(name, self.shadow) if self.shadow else None
        unversioned = (lambda w: ShadowedWorker(w, mirror)) if mirror else (lambda w: w)
        self._unversioned_default = unversioned(self.default)
        self._unversioned = {version: unversioned(self.by_version[version]) for version in weights}
        self._open_version = open_version

    @classmethod
    def declared(cls, spec: ModelSpec, workers: Mapping[str, Worker], serving: str) -> "ServedModel":
        """A model of the config: its live versions, split and shadow as the spec says."""
        return cls(spec.name, workers, spec.version, spec.traffic, spec.shadow, serving)

    async def pick(self, version: str | None, key: str | None) -> Worker:
        """The worker for an explicit ``version``, else the split's choice for ``key`` (an
        unversioned request: the shadow, if any, gets a copy of it)."""
        if version is None:
            return self._unversioned[self.split.choose(key)] if self.split else self._unversioned_default
        worker = self.by_version.get(version)
        if worker is None and self._open_version is not None:
            worker = self.by_version[version] = await self._open_version(version)
        if worker is None:
            raise ModelNotFoundError(
                f"model {self.name!r} has no version {version!r} loaded; loaded: {sorted(self.by_version)}")
        return worker

    def describe(self) -> list[dict]:
        """One entry per live version (the model index)."""
        entries = []
        for version, worker in sorted(self.by_version.items()):
            entries.append({
                "name": self.name, "version": version, "state": "READY", "serving": self.serving,
                "default": worker is self.default,
                "traffic_percent": self.weights.get(version, 0.0) if self.split else (
                    100.0 if worker is self.default else 0.0),
                "shadow": worker is self.shadow,
                "framework": worker.meta.framework, "task": worker.meta.task,
            })
        return entries

    def close(self) -> None:
        for worker in distinct(self.by_version.values()):
            worker.close()
