"""One request's lifecycle, the same for every route of every transport (HTTP, gRPC):
admission (overload is shed), authentication, the model's timeout, errors mapped to statuses,
metrics and the access log.

A route runs its work inside ``async with lifecycle.scope(call, protocol, model) as scope:``,
hands the scope its reply (``scope.reply(content, version)``) and returns ``scope.response``:
whatever the work raised has become the transport's answer by then. ``call`` is the request as
its transport carries it (:class:`Call`): it reads headers (gRPC metadata) and turns a reply or
an error status into the transport's answer, so statuses, reasons, metrics and log lines are
decided here once for both transports.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any, Callable, Protocol

from serve_app import auth
from serve_app.config import AccessLogSpec, AdmissionSpec
from serve_app.errors import InferenceError, InferenceTimeout, Overloaded, Unauthorized
from serve_app.monitoring import telemetry
from serve_app.serving.registry import ModelRegistry

# Serve's own logger: its records get Serve's JSON encoding and the request id.
logger = logging.getLogger("ray.serve")
INTERNAL_ERROR = "internal error; see server logs"
# Shed requests get no line each (thousands a second under overload): one line at most this often.
SHED_LOG_INTERVAL_S = 10.0


class Call(Protocol):
    """One request as its transport carries it (``serve_app.http.lifecycle.HttpCall``,
    ``serve_app.grpc.servicer.GrpcCall``)."""

    method: str  # for the access log: the HTTP method, or "GRPC"
    path: str  # the URL path, or the gRPC method's full name

    def header(self, name: str) -> str | None:
        """A request header (gRPC: invocation metadata) by its lower-case name."""

    def status(self, reply: Any) -> int:
        """The HTTP status a route's reply stands for (a gRPC reply is a 200)."""

    def success(self, reply: Any, version: str | None) -> Any:
        """The transport's answer for a reply; ``version``, when given, answered it."""

    def failure(self, status: int, message: str, reason: str | None, retry_after_s: int | None = None) -> Any:
        """The transport's answer for an error with this HTTP status and reason; ``retry_after_s``:
        when the client may try again."""


class RequestRefused(Exception):
    """A request refused before its work began (shed, or no valid token), with its finished answer.

    A ``with`` block cannot skip its body, so the scope raises this from ``__aenter__``; the
    transport sends ``response`` as it is."""

    def __init__(self, response: Any):
        super().__init__("refused")
        self.response = response


def sampled_trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<trace id>-<parent id>-<flags>``)
    whose sampled flag is set; None for a missing, malformed or unsampled one."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[3]) != 2:
        return None
    try:
        sampled = int(parts[3], 16) & 1
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower() if sampled and parts[1] != "0" * 32 else None


class Admission:
    """Slots for the requests under way in one replica; a request finds a free one or waits for
    one, at most ``max_wait_s``, else it is refused (shed).

    A finished request hands its slot to the newest waiter: under overload the accepted
    requests are those that waited least, so they answer about as fast as at full load (under
    light load at most a few wait and the order hardly matters). No lock: every request of a
    replica runs on its one event loop."""

    def __init__(self, slots: int):
        self.free = slots
        self._waiters: deque[asyncio.Future] = deque()

    async def enter(self, max_wait_s: float) -> bool:
        """Whether the request got a slot (then it must ``leave()``), at once or within ``max_wait_s``."""
        if self.free > 0:  # there are waiters only while no slot is free
            self.free -= 1
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max_wait_s):
                await waiter
            return True
        except TimeoutError:
            return not self._forget(waiter)  # a slot handed over as the timer fired is taken
        except asyncio.CancelledError:  # the client left
            if not self._forget(waiter):
                self.leave()
            raise

    def _forget(self, waiter: asyncio.Future) -> bool:
        """Drop a waiter that gives up; False when a slot was handed to it already."""
        if waiter.done() and not waiter.cancelled():
            return False
        try:
            self._waiters.remove(waiter)  # the oldest give up: found near the left end
        except ValueError:
            pass
        return True

    def leave(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on
                return
        self.free += 1


class RequestLifecycle:
    """What every request of one ingress replica shares: the token, the access-log policy,
    admission (how many requests are under way), and the registry (which names are served,
    each model's timeout)."""

    def __init__(self, registry: ModelRegistry, access_log: AccessLogSpec, token: bytes | None,
                 admission: AdmissionSpec | None = None, draw: Callable[[], float] = random.random):
        self.registry, self.access_log, self.token, self._draw = registry, access_log, token, draw
        self.admission = admission or AdmissionSpec()
        self._slots = Admission(self.admission.max_requests)
        self._shed_unlogged, self._shed_logged_at = 0, -SHED_LOG_INTERVAL_S

    def scope(self, call: Call, protocol: str, model: str, *, public: bool = False,
              timeout: float | None = None) -> "RequestScope":
        """``public``: no token needed (health probes). ``timeout``: instead of the model's."""
        return RequestScope(self, call, protocol, model, public,
                            self.registry.timeout_for(model) if timeout is None else timeout)

    async def admit(self) -> Overloaded | None:
        """Take a slot for one request (see :class:`Admission`); the refusal when none came in time.

        The refusal is sent ``refuse_after_s`` after arrival: refusing costs a replica about as
        much as answering a one-row request (Serve's per-request work dominates both), and a
        client refused at once may send again at once (load generators, naive retries); held,
        each such client costs one refusal per ``refuse_after_s``, not the replica's CPU. A held
        request costs nothing while it waits."""
        arrived = asyncio.get_running_loop().time()
        if await self._slots.enter(self.admission.max_wait_s):
            return None
        await asyncio.sleep(arrived + self.admission.refuse_after_s - asyncio.get_running_loop().time())
        return Overloaded(f"overloaded: {self.admission.max_requests} requests are under way in this replica and "
                          f"none came free for this one within {self.admission.max_wait_s} s; retry in "
                          f"{self.admission.retry_after_s} s", self.admission.retry_after_s)

    def release(self) -> None:
        self._slots.leave()

    def authorized(self, call: Call) -> bool:
        return self.token is None or auth.authorized(call.header("authorization"), self.token)

    def finish(self, call: Call, protocol: str, name: str, started: float, outcome: Any,
               version: str | None) -> Any:
        """The answer for ``outcome`` (a reply, or what the work raised), counted and logged."""
        reason = message = retry_after_s = None
        if isinstance(outcome, Overloaded):
            status, message, reason, retry_after_s = 503, outcome.message, outcome.reason, outcome.retry_after_s
            self._log_shed()
        elif isinstance(outcome, InferenceError):
            status, message, reason = outcome.status_code, outcome.message, outcome.reason
            client = status < 500
            (logger.warning if client else logger.error)(
                "%s %s request for model %r: %s (%s)", "rejected" if client else "failed", protocol, name,
                message, reason,
                extra={"model": name, "protocol": protocol, "reason": reason, "status_code": status})
        elif isinstance(outcome, BaseException):
            logger.error("inference failed for model %r", name, exc_info=outcome,
                         extra={"model": name, "protocol": protocol, "status_code": 500})
            status, message = 500, INTERNAL_ERROR
        else:
            status = call.status(outcome)
        # Only served names become label values: arbitrary URLs must not create metric series.
        # (A long-tail model is known once its first request has opened it.)
        served = self.registry.known(name)
        if served is None:
            model, version = telemetry.UNKNOWN_MODEL, ""
        else:
            model, version = name, version or served.default.meta.version
        if message is not None:
            answer = call.failure(status, message, reason, retry_after_s)
        else:  # which version answered (canary, shadow), for a served model's good answers
            answer = call.success(outcome, version if served is not None and status < 400 else None)
        elapsed = time.perf_counter() - started
        telemetry.request_done(model, version, protocol, status, elapsed, reason)
        if retry_after_s is None:  # shed requests are counted, not logged one by one
            self._log_access(call, protocol, model, version, status, elapsed)
        return answer

    def _log_shed(self) -> None:
        self._shed_unlogged += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= SHED_LOG_INTERVAL_S:
            logger.warning("overloaded: shed %d requests since the last such line (503, reason overloaded): this "
                           "replica works on args.admission.max_requests=%d at once", self._shed_unlogged,
                           self.admission.max_requests, extra={"reason": "overloaded", "status_code": 503})
            self._shed_unlogged, self._shed_logged_at = 0, now

    def _log_access(self, call: Call, protocol: str, model: str, version: str, status: int,
                    seconds: float) -> None:
        """One access line for the requests worth reading (see AccessLogSpec), in Serve's JSON
        log with Serve's request id; Serve's own every-request access log is off."""
        trace_id = sampled_trace_id(call.header("traceparent"))
        if not self.access_log.wants(status, seconds, trace_id is not None, self._draw()):
            return
        logger.info("%s %s %d %.1fms", call.method, call.path, status, seconds * 1000,
                    extra={"model": model, "model_version": version, "protocol": protocol,
                           "status_code": status, "latency_ms": round(seconds * 1000, 3),
                           "trace_id": trace_id})


class RequestScope:
    """One request under way (see the module docstring)."""

    def __init__(self, lifecycle: RequestLifecycle, call: Call, protocol: str, model: str,
                 public: bool, timeout: float | None):
        self._lifecycle, self._call, self._protocol, self._model = lifecycle, call, protocol, model
        self._public, self._timeout = public, timeout
        self._reply: Any = None
        self._version: str | None = None
        self._admitted = False
        self.response: Any = None

    def reply(self, content: Any, version: str | None = None) -> None:
        """The route's answer (whatever its transport's ``Call.success`` takes) and the model
        version it comes from (labels the metrics and the answer; default: the model's default)."""
        self._reply = content
        self._version = version

    async def __aenter__(self) -> "RequestScope":
        self._started = time.perf_counter()
        arrived = asyncio.get_running_loop().time()
        lifecycle = self._lifecycle
        if not self._public:  # health probes are neither authenticated nor held back
            if not lifecycle.authorized(self._call):
                raise RequestRefused(self._finish(
                    Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")))
            refusal = await lifecycle.admit()
            if refusal is not None:
                raise RequestRefused(self._finish(refusal))
            self._admitted = True
        # The timeout counts from arrival, the wait for admission included; no extra task per
        # request, unlike wait_for.
        self._timer = asyncio.timeout_at(None if self._timeout is None else arrived + self._timeout)
        await self._timer.__aenter__()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self._admitted:
            self._admitted = False
            self._lifecycle.release()
        try:
            await self._timer.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            exc = InferenceTimeout(f"model {self._model!r} did not answer within {self._timeout} s")
        if exc is not None and not isinstance(exc, Exception):
            return False  # cancelled (the client left, or Serve stops): nobody waits for an answer
        if exc is None and self._reply is None:
            exc = RuntimeError("the route set no reply")
        self.response = self._finish(exc if exc is not None else self._reply)
        return True

    def _finish(self, outcome: Any) -> Any:
        return self._lifecycle.finish(self._call, self._protocol, self._model, self._started, outcome,
                                      self._version)
