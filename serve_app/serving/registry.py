"""The models an ingress replica serves, by name: the declared ones, the long tail seen so
far, reload swaps, and the repository index.

Plain Python on purpose (no HTTP, no Serve): routes ask it which worker answers, and it asks
a :class:`Placement` for workers, so it is tested without Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Iterable, Protocol

from serve_app.config import AppConfig, ModelSpec
from serve_app.errors import ModelNotFoundError, ModelTooLarge, ReloadFailed
from serve_app.metadata import ModelMetadata
from serve_app.runtimes import ArtifactError, check_loadable
from serve_app.serving.interface import Worker, close_later, distinct
from serve_app.serving.served import ServedModel
from serve_app.serving.worker import refuse_if_too_large
from serve_app.store import ModelStoreError, ModelStore, NotInStore, version_sort_key

logger = logging.getLogger("ray.serve")

# A name found missing in the store is not looked up again for this long: a flood of unknown
# names stays off the store.
ABSENT_FOR_S = 5.0
# Long-tail models whose metadata the registry keeps (the models themselves live elsewhere).
MAX_TAIL_ENTRIES = 1000
# How many of the newest stored versions "latest" tries, newest first, when they cannot be
# loaded (a tampered artifact, an untrusted type): an older good one serves instead.
LATEST_CANDIDATES = 3


class Placement(Protocol):
    """Opens workers wherever the models run (serve_app.deployments.placement)."""

    def declared(self, spec: ModelSpec) -> tuple[dict[str, Worker], str]:
        """A worker per live version label of ``spec``, and how it is served."""
        ...

    def tail(self, meta: ModelMetadata) -> Worker:
        """A worker for one stored version of a long-tail model."""
        ...


class ModelRegistry:
    def __init__(self, config: AppConfig, store: ModelStore, placement: Placement):
        self.config, self.store, self._placement = config, store, placement
        self._specs = {spec.name: spec for spec in config.models}
        self._swap_locks: dict[str, asyncio.Lock] = {}
        self._tail_max_bytes = config.multiplexed.max_model_bytes if config.multiplexed else config.max_model_bytes
        self.declared: dict[str, ServedModel] = {spec.name: self._open(spec) for spec in config.models}
        self._tail: OrderedDict[str, ServedModel] = OrderedDict()
        # name -> (until when, the error its lookup gave: not in the store, or refused)
        self._absent: dict[str, tuple[float, Exception]] = {}

    def _open(self, spec: ModelSpec) -> ServedModel:
        return ServedModel.declared(spec, *self._placement.declared(spec))

    # -- lookups ------------------------------------------------------------------------------
    def known(self, name: str) -> ServedModel | None:
        """The model if it is served already (declared, or a long-tail model seen before)."""
        return self.declared.get(name) or self._tail.get(name)

    def timeout_for(self, name: str) -> float | None:
        known = self.known(name)
        if known is not None:
            return known.default.spec.timeout_s
        return self.config.multiplexed.timeout_s if self.config.multiplexed else None

    async def served(self, name: str) -> ServedModel:
        """The model called ``name``, opening a long-tail model on its first request; 404
        when it is neither declared nor (for the long tail) in the store."""
        served = self.known(name)
        if served is not None:
            return served
        mux = self.config.multiplexed
        if mux is None or not mux.serves(name):
            raise ModelNotFoundError(f"model {name!r} is not served; served: {sorted(self.declared)}")
        until, error = self._absent.get(name, (0.0, None))
        if until > time.monotonic():
            raise error
        try:
            served = self._tail[name] = await self._open_tail(name)
        except (ModelNotFoundError, ReloadFailed, ModelTooLarge) as exc:
            self._absent[name] = (time.monotonic() + ABSENT_FOR_S, exc)
            raise
        while len(self._tail) > MAX_TAIL_ENTRIES:
            self._tail.popitem(last=False)
        return served

    async def _open_tail(self, name: str) -> ServedModel:
        default = await self._open_tail_version(name, None)
        return ServedModel(name, {"latest": default}, "latest", serving="multiplexed",
                           open_version=lambda version: self._open_tail_version(name, version))

    async def _open_tail_version(self, name: str, version: str | None) -> Worker:
        return self._placement.tail(await asyncio.to_thread(self._loadable, name, version))

    def _loadable(self, name: str, version: str | None) -> ModelMetadata:
        """The metadata of ``version`` of a long-tail model, checked as a load would check it
        (its size against ``max_model_bytes`` before a byte is read, metadata accepted,
        artifact's sha256, trusted types) before any replica loads it: a replica refusing a
        model would already have evicted one to make room. ``latest`` is the newest stored
        version that passes: a version that does not leaves the previous one serving, never a
        server error. 404 when there is no such version, 409 when the store's versions are
        refused (``model_too_large`` when size alone refused them, else ``reload_failed``)."""
        try:
            stored = self.store.versions(name)
        except (ModelStoreError, ValueError):
            stored = []
        candidates = stored[::-1][:LATEST_CANDIDATES] if version is None else [version]
        if version is None and not candidates:
            raise ModelNotFoundError(f"model {name!r} is not served and not in the store; served: "
                                     f"{sorted(self.declared)}")
        refused = []
        for candidate in candidates:
            try:
                meta = self.store.read_metadata(name, candidate)
                refuse_if_too_large(meta, self.store.artifact_size(meta), self._tail_max_bytes)
                check_loadable(self.store, meta)
            except (NotInStore, ValueError):  # an absent or invalid version number
                if version is None:
                    continue
                raise ModelNotFoundError(f"model {name!r} has no version {version!r} in the store") from None
            except (ModelStoreError, ArtifactError, ModelTooLarge) as exc:
                refused.append(exc)
                continue
            if refused:
                logger.warning("model %r: serving version %s; newer versions refused: %s", name, candidate,
                               "; ".join(map(str, refused)))
            return meta
        if not refused:
            raise ModelNotFoundError(f"model {name!r} is not served and not in the store; served: "
                                     f"{sorted(self.declared)}")
        if all(isinstance(exc, ModelTooLarge) for exc in refused):
            raise refused[0]
        raise ReloadFailed(f"model {name!r}: the store's version cannot be served: {'; '.join(map(str, refused))}")

    async def for_inference(self, name: str, version: str | None, key: str | None) -> Worker:
        """The worker that answers: ``version`` when the request names one, else the canary
        split's choice for ``key`` (the request id: sticky per id), shadowed if the model has
        a shadow version."""
        return await (await self.served(name)).pick(version, key)

    async def for_metadata(self, name: str, version: str | None) -> Worker:
        """The worker whose metadata describes the model: ``version``, else the default
        version (never a canary draw: a description must not change from call to call)."""
        served = await self.served(name)
        return served.default if version is None else await served.pick(version, None)

    def hosted(self) -> list[str]:
        """The models this replica serves now (a reload waits for the replicas hosting one)."""
        return [*self.declared, *self._tail]

    def workers(self) -> list[Worker]:
        """Every worker of every served model, each once (health checks)."""
        return distinct(w for served in [*self.declared.values(), *self._tail.values()]
                        for w in served.by_version.values())

    # -- reloads ------------------------------------------------------------------------------
    async def reload(self, name: str) -> None:
        """Reload ``name`` from the store (``latest`` resolved again); requests in flight
        finish on the old workers."""
        if name in self.declared:
            async with self._swap_lock(name):  # the spec read once any rollout of it is done
                await self._reopen(self._specs[name])
        else:
            self._absent.pop(name, None)  # a lookup that found nothing a moment ago runs again
            if name not in self._tail:
                return
            # Swapped, not dropped: a request in flight still finds the model (its version header,
            # its metrics' labels); the fresh entry has a new model id for Serve's multiplexing.
            try:
                self._tail[name] = await self._open_tail(name)
            except (ModelNotFoundError, ReloadFailed, ModelTooLarge):
                self._tail.pop(name, None)  # the next request looks it up again and says why

    async def respecify(self, specs: Iterable[ModelSpec]) -> dict[str, str]:
        """Serve the declared models by ``specs`` (the ingress's ``user_config``,
        :class:`serve_app.config.Rollout`). A model whose live versions, split or shadow changed
        opens again as a redeploy would open it (``latest`` resolved again; requests in flight
        finish on the old workers), without a restart; one whose batching, timeout or drift
        settings alone changed is reconfigured in place. A model that cannot open keeps serving
        as it was (raising here would make Serve stop the replica), but the new spec is kept,
        so a reload (``POST /v2/repository/models/<name>/load``) tries it again. Returns the
        errors by model."""
        errors = {}
        for spec in specs:
            if spec.name not in self._specs:
                continue
            async with self._swap_lock(spec.name):
                current = self._specs[spec.name]
                if spec == current:
                    continue
                if spec.routing == current.routing:
                    for worker in distinct(self.declared[spec.name].by_version.values()):
                        worker.reconfigure(spec.for_version(worker.spec.version))
                    self._specs[spec.name] = spec
                    continue
                try:
                    await self._reopen(spec)
                except Exception as exc:  # any failure to open leaves the model serving as it was
                    self._specs[spec.name] = spec
                    errors[spec.name] = f"{type(exc).__name__}: {exc}"
        return errors

    def _swap_lock(self, name: str) -> asyncio.Lock:
        """One swap of a declared model at a time: a reload and a rollout of the same model
        interleave at their loads, and the later swap would undo the other."""
        return self._swap_locks.setdefault(name, asyncio.Lock())

    async def _reopen(self, spec: ModelSpec) -> None:
        fresh = await asyncio.to_thread(self._open, spec)
        old, self.declared[spec.name], self._specs[spec.name] = self.declared[spec.name], fresh, spec
        # requests queued on the old workers keep the time they were promised
        close_later(old.by_version.values(), max(spec.timeout_s, old.default.spec.timeout_s))

    # -- the repository index ------------------------------------------------------------------
    async def index(self) -> list[dict]:
        """Live versions (READY) and the store's other versions (UNAVAILABLE, or loaded on
        first use when the multiplexed long tail serves them)."""
        entries = [entry for served in [*self.declared.values(), *self._tail.values()]
                   for entry in served.describe()]
        live = {(e["name"], e["version"]) for e in entries}
        stored = await asyncio.to_thread(self.store.list_models)
        mux = self.config.multiplexed
        for name, versions in sorted(stored.items()):
            tail = mux is not None and name not in self.declared and mux.serves(name)
            for version in versions:
                if (name, version) not in live:
                    entries.append({"name": name, "version": version, "state": "UNAVAILABLE",
                                    "serving": "multiplexed" if tail else None,
                                    "reason": "loads on first request" if tail else "in the store, not configured"})
        return sorted(entries, key=lambda e: (e["name"], version_sort_key(e["version"])))

    async def names(self) -> list[str]:
        """The models a client can call now: live ones, and the long tail's stored ones."""
        return sorted({entry["name"] for entry in await self.index()
                       if entry["state"] == "READY" or entry["serving"] == "multiplexed"})
