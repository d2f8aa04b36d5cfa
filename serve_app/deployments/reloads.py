"""Reloading a model from the store in every replica that serves it, without a restart.

An HTTP request reaches one replica, but a model lives in every ingress replica (and in each
replica of a dedicated deployment). So a reload is a *generation* bump on a small named Ray
actor, the :class:`ReloadBoard` of the application, and every replica watches the board
(:class:`ReloadWatcher`, one poll a second): a model whose generation moved is reloaded from
the store (``latest`` is resolved again) and the replica acknowledges the generation. The
admin endpoint waits until every replica seen in the last few seconds has acknowledged.

The board is detached (it outlives any one replica) and small (no CPU reserved). If it is
lost, the next poll creates a new one with a new epoch; replicas take a new epoch as the new
baseline, so a board restart reloads nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Awaitable, Callable, Iterable

import ray
from ray import serve

logger = logging.getLogger("ray.serve")

NAMESPACE = "serve-app"
POLL_INTERVAL_S = 1.0
# A replica that has not polled for this long is gone (or stuck): a reload does not wait for it.
REPLICA_SILENT_AFTER_S = 5.0
# How long a reload request (the repository extension's load) waits for every replica to reload.
RELOAD_TIMEOUT_S = 60.0


@ray.remote(num_cpus=0, max_concurrency=64)
class ReloadBoard:
    def __init__(self):
        self.epoch = uuid.uuid4().hex
        self.generations: dict[str, int] = {}
        # replica -> (last poll, hosted models, acknowledged generations, failed reloads,
        #             the generation each model was last reloaded at)
        self.replicas: dict[str, tuple] = {}

    def bump(self, model: str) -> int:
        self.generations[model] = self.generations.get(model, 0) + 1
        return self.generations[model]

    def poll(self, replica: str, hosted: list[str], acknowledged: dict[str, int],
             failed: dict[str, str], reloaded: dict[str, int]) -> tuple[str, dict[str, int]]:
        self.replicas[replica] = (time.monotonic(), frozenset(hosted), dict(acknowledged), dict(failed),
                                  dict(reloaded))
        return self.epoch, dict(self.generations)

    def status(self, model: str, generation: int) -> tuple[int, list[str], dict[str, str]]:
        """Of the live replicas: how many reloaded ``model`` at ``generation``, which host it
        and have not acknowledged ``generation`` yet, and the errors of those whose reload
        failed (they kept the old model)."""
        now = time.monotonic()
        live = {replica: state for replica, state in self.replicas.items() if now - state[0] < REPLICA_SILENT_AFTER_S}
        pending = sorted(r for r, (_, hosted, acked, _, _) in live.items()
                         if model in hosted and acked.get(model, 0) < generation)
        failed = {r: errors[model] for r, (_, _, acked, errors, _) in live.items()
                  if acked.get(model, 0) >= generation and model in errors}
        reloaded = sum(1 for (_, _, _, _, done) in live.values() if done.get(model, 0) >= generation)
        return reloaded, pending, failed


def board_name(app_name: str) -> str:
    return f"reload-board-{app_name}"


def get_board(app_name: str):
    return ReloadBoard.options(name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                               lifetime="detached").remote()


class ReloadWatcher:
    """Polls the board from a replica and reloads the models whose generation moved.

    ``hosted`` says which models the replica serves now; ``reload(name)`` swaps one of them.
    Made in a replica's constructor: it reads the application and replica from Serve.
    """

    def __init__(self, hosted: Callable[[], Iterable[str]], reload: Callable[[str], Awaitable[None]]):
        context = serve.get_replica_context()
        self.app_name, self.replica = context.app_name, context.replica_id.unique_id
        self._hosted, self._reload = hosted, reload
        self._epoch: str | None = None
        self._generations: dict[str, int] = {}
        self._failed: dict[str, str] = {}
        self._reloaded: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start polling from a thread of its own: a slow or lost board (a Ray call of up to
        10 s) never holds the replica's event loop; only the reload itself runs there."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="serve-app-reloads", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        board = None
        while True:
            try:
                board = board or get_board(self.app_name)
                epoch, generations = ray.get(board.poll.remote(
                    self.replica, list(self._hosted()), dict(self._generations), dict(self._failed),
                    dict(self._reloaded)), timeout=10)
                if epoch != self._epoch:  # first poll, or a new board: the baseline, nothing to do
                    self._epoch, self._generations = epoch, dict(generations)
                else:
                    for model, generation in generations.items():
                        if generation > self._generations.get(model, 0):
                            if model in set(self._hosted()):
                                # The reload itself runs on the replica's loop (it swaps its models).
                                asyncio.run_coroutine_threadsafe(
                                    self._reload_one(model, generation), self._loop).result(timeout=600)
                            self._generations[model] = generation
            except ray.exceptions.RayActorError:
                board = None  # the board is gone: the next poll makes a new one
            except Exception:
                logger.exception("reload watcher: poll failed")
            time.sleep(POLL_INTERVAL_S)

    def generation(self, model: str) -> int:
        return self._generations.get(model, 0)

    async def caught_up(self, model: str, generation: int, timeout_s: float = 3 * POLL_INTERVAL_S) -> None:
        """Wait (briefly) until this replica's next poll has seen ``generation`` of ``model``."""
        deadline = time.monotonic() + timeout_s
        while self.generation(model) < generation and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL_S / 4)

    async def _reload_one(self, model: str, generation: int) -> None:
        try:
            await self._reload(model)
            self._failed.pop(model, None)
            self._reloaded[model] = generation
        except Exception as exc:  # the old model keeps serving; the admin call reports the error
            logger.exception("reloading model %r failed; the loaded version keeps serving", model)
            self._failed[model] = f"{type(exc).__name__}: {exc}"


async def request_reload(app_name: str, model: str, timeout_s: float) -> tuple[int, int, list[str], dict[str, str]]:
    """Bump ``model``'s generation and wait until every live replica hosting it has reloaded.
    Returns the generation, and :meth:`ReloadBoard.status` at the end (replicas reloaded,
    still pending, failed)."""
    board = get_board(app_name)
    generation = await board.bump.remote(model)
    deadline = time.monotonic() + timeout_s
    while True:
        hosts, pending, failed = await board.status.remote(model, generation)
        if not pending or time.monotonic() > deadline:
            return generation, hosts, pending, failed
        await asyncio.sleep(0.25)
