"""Overload: shed, don't collapse (docs/configuration.md#overload).

The unit tests drive the admission of one replica's request lifecycle without Ray: who gets a
free slot, who is refused, and what a refusal looks like. The live test drives the session's
cluster (two ingress replicas, fast path) with h2load: a sized load of 32 clients, then 1,000
clients resending at once, over HTTP/1.1 and over gRPC. h2load logs every request's status and
latency (wrk's Lua hooks cannot tell which latency belongs to which status); a gRPC status
travels in trailers h2load does not read, so gRPC answers are counted by the server's metrics,
which must add up to every call h2load made.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
from starlette.requests import Request

from bench.workloads import GRPC_INFER, features, grpc_infer, v2_json
from conftest import require_tool
from serve_app.config import AccessLogSpec, AdmissionSpec
from serve_app.errors import InferenceTimeout
from serve_app.grpc import open_inference_grpc_pb2 as pb
from serve_app.http.lifecycle import HttpCall
from serve_app.lifecycle import Admission, RequestLifecycle, RequestRefused
from serve_app.store import ModelStore
from serve_app.tools.train import train_model
from test_registry import registry_for

SIZED, OVERLOAD = 32, 1000  # clients: what two ingress replicas are sized for, and many times that
WARMUP_S, MEASURE_S = 3, 8  # h2load's warm-up (1,000 connections opening at once), then each thread's window
CLIENT_TIMEOUT_S = 5.0  # an answer later than this counts as a socket timeout
MAIN = {"application": "models"}  # the session cluster runs three applications
RAY_WORKER_NICENESS = 15  # Ray 2.60's default worker_niceness (the raylet's config)
FAILED = {"-1", "0"}  # h2load's status of a request that got no answer (a failed stream, a closed connection)
# Goodput at OVERLOAD over the SIZED throughput, while every h2load thread measures (Run.window).
# HTTP: the 0.7 (measured 0.92-0.95). gRPC is not shed the same way: Serve's gRPC server in
# the replica accepts one call per turn of its event loop, so at 1,000 clients ~500 calls per replica
# wait inside gRPC's core, unseen by any admission in the replica (HAProxy's stats: 500 streams open
# per replica, a handful admitted). Its goodput is what the replica does with them: 0.63-0.82.
GOODPUT_FLOOR = {"v2": 0.7, "grpc": 0.5}
# The accepted requests' p99 at OVERLOAD. HTTP: the issue's 1 s (measured 0.24-0.59 s). gRPC: that
# hidden queue is a client's wait (1,000 clients over ~900 calls/s: p50 ~0.9 s, p99 1.0-1.6 s);
# the bound catches a wait that grows further.
ACCEPTED_P99_S = {"v2": 1.0, "grpc": 2.5}


# -- admission, without Ray ----------------------------------------------------------------------
def test_a_freed_slot_goes_to_the_newest_waiter_and_the_oldest_are_refused():
    async def scenario():
        admission, order = Admission(1), []
        assert await admission.enter(0)

        async def client(name: str, wait: float):
            admitted = await admission.enter(wait)
            order.append((name, admitted))
            if admitted:
                admission.leave()

        oldest = asyncio.create_task(client("oldest", 0.2))
        await asyncio.sleep(0.01)
        newest = asyncio.create_task(client("newest", 5))
        await asyncio.sleep(0.01)
        admission.leave()  # the slot passes to the newest waiter, who hands it back at once
        await newest
        await oldest  # then free: the oldest got it too, without waiting for its deadline
        assert order == [("newest", True), ("oldest", True)]
        assert admission.free == 1

        assert await admission.enter(0)  # full again: a waiter past its deadline is refused
        started = time.monotonic()
        assert not await admission.enter(0.05)
        assert 0.05 <= time.monotonic() - started < 1
        cancelled = asyncio.create_task(admission.enter(5))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # a client that leaves while waiting gives its place up
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        admission.leave()
        assert admission.free == 1 and not admission._waiters
    asyncio.run(scenario())


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    train_model("iris", store, version="1")
    return registry_for(store, [{"name": "iris"}])


def http_call(path: str = "/v2/models/iris/infer") -> HttpCall:
    return HttpCall(Request({"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": []}))


def test_a_request_beyond_the_bound_is_a_json_503_with_retry_after_and_probes_pass(registry, caplog):
    life = RequestLifecycle(registry, AccessLogSpec(sample_rate=0), None,
                            AdmissionSpec(max_requests=1, max_wait_s=0.05, refuse_after_s=0.2, retry_after_s=2))

    async def scenario():
        release = asyncio.Event()

        async def slow(public=False):
            async with life.scope(http_call(), "v2", "iris", public=public) as scope:
                await release.wait()
                scope.reply({"ok": True})
            return scope.response

        holder = asyncio.create_task(slow())
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(RequestRefused) as refused:
            async with life.scope(http_call(), "v2", "iris"):
                pass
        assert 0.2 <= time.monotonic() - started < 1, "refused refuse_after_s after arrival"
        probe = asyncio.create_task(slow(public=True))  # health probes are never held back
        await asyncio.sleep(0.01)
        release.set()
        return refused.value.response, await holder, await probe

    with caplog.at_level("INFO", logger="ray.serve"):
        shed, held, probe = asyncio.run(scenario())
    assert shed.status_code == 503 and shed.headers["retry-after"] == "2"
    body = orjson.loads(shed.body)
    assert body["reason"] == "overloaded" and "retry in 2 s" in body["error"], body
    assert held.status_code == 200 and probe.status_code == 200
    assert [r.levelname for r in caplog.records] == ["WARNING"], "one summary line, no line per shed request"


def test_the_timeout_counts_from_arrival_the_wait_for_a_slot_included(registry):
    life = RequestLifecycle(registry, AccessLogSpec(sample_rate=0), None,
                            AdmissionSpec(max_requests=1, max_wait_s=5, refuse_after_s=5))

    async def scenario():
        async def request(hold: float):
            async with life.scope(http_call(), "v2", "iris", timeout=0.3) as scope:
                await asyncio.sleep(hold)
                scope.reply({"ok": True})
            return scope.response

        first = asyncio.create_task(request(0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(request(0.2))  # waits ~0.2 s for the slot: 0.4 s in all
        return await first, await second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == InferenceTimeout.status_code and orjson.loads(second.body)["reason"] == "timeout"


# -- the live overload -----------------------------------------------------------------------------
@dataclass
class Run:
    """What h2load logged: the requests that started in the measured window (after the warm-up;
    the ones still under way when it ended are dropped, unlogged)."""

    rows: list[tuple[float, str, float]]  # (start s, status, latency s)
    errors: int  # streams h2load saw fail: reset, timed out, errored (no status)

    def window(self) -> tuple[float, float]:
        """When every h2load thread was measuring. Each thread starts its MEASURE_S once its own
        warm-up is over, and at 1,000 clients the second thread's connections open up to 2 s
        after the first's; until then the requests the first thread logs are the oldest waiters,
        which the admission serves last, while the second thread's unlogged warm-up requests take
        the slots (in one run the log's first 2 s held 32 200s, the rest ~1,900 a second)."""
        starts = [r[0] for r in self.rows]
        return max(starts) - MEASURE_S, min(starts) + MEASURE_S

    def answered_per_s(self, accepted) -> float:
        """Accepted answers (``accepted(status, latency)``) to requests sent and answered within
        the window, per second."""
        begin, end = self.window()
        assert end - begin >= MEASURE_S / 2, f"h2load's threads measured only {end - begin:.1f} s together"
        return sum(1 for start, status, lat in self.rows
                   if accepted(status, lat) and start >= begin and start + lat <= end) / (end - begin)

    def timeouts(self) -> int:
        return self.errors + sum(1 for _, status, lat in self.rows if status in FAILED or lat > CLIENT_TIMEOUT_S)


def h2load(url: str, request, connections: int, folder: Path, *, h1: bool, extra_headers: dict | None = None) -> Run:
    """``connections`` clients, each sending ``request`` again as soon as it is answered (one at a
    time, as wrk does) for WARMUP_S + MEASURE_S seconds."""
    body, log = folder / "body", folder / f"h2load-{connections}.log"
    body.write_bytes(request.body)
    log.unlink(missing_ok=True)
    # h2load runs at the niceness Ray gives its workers (the replicas, their HAProxy): on the two
    # cores it shares with the server it competes with it as an equal. At niceness 0 it was served
    # first, which no remote client is (accepted p99 0.68-1.08 s against 0.45-0.59 s).
    command = ["nice", "-n", str(RAY_WORKER_NICENESS), require_tool("h2load"),
               "-c", str(connections), "-m", "1", "-t", "2", "-D", str(MEASURE_S),
               "--warm-up-time", str(WARMUP_S), "-d", str(body), f"--log-file={log}", *(["--h1"] if h1 else [])]
    for key, value in {**request.headers, **(extra_headers or {})}.items():
        command += ["-H", f"{key}: {value}"]
    # h2load's output goes to a file: read from a pipe while it runs, it cost this process half a
    # core (poll woken over and over) on the cores the server runs on.
    output = folder / f"h2load-{connections}.out"
    with output.open("w") as sink:
        run = subprocess.run([*command, url + request.path], stdout=sink, stderr=subprocess.STDOUT,
                             timeout=WARMUP_S + MEASURE_S + 60)
    out = output.read_text()
    assert run.returncode == 0 and log.exists(), out[-1600:]
    rows = [(int(s) / 1e6, status, int(us) / 1e6) for s, status, us, *_ in
            (line.split("\t") for line in log.read_text().splitlines())]
    summary = next(line for line in out.splitlines() if line.startswith("requests:"))
    counts = {name: int(n) for n, name in (part.strip().split(" ", 1) for part in summary[9:].split(",")
                                          if part.strip().split(" ", 1)[0].isdigit())}
    return Run(rows, counts.get("errored", 0) + counts.get("timeout", 0))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def pinned_to_two_ingress_replicas(cluster) -> None:
    """The issue's scenario: two ingress replicas. Serve's autoscaler counts requests waiting for
    admission as ongoing and would start more replicas seconds into the overload, on the same
    two cores the measurement runs on. The session keeps two from here on (as it starts with)."""
    config = copy.deepcopy(cluster.config)
    app = next(a for a in config["applications"] if a["name"] == "models")
    ingress = next(d for d in app["deployments"] if d["name"] == "ModelServer")
    ingress["autoscaling_config"].update(min_replicas=2, initial_replicas=2, max_replicas=2)
    with cluster.serve_api() as api:
        assert api.put("/api/serve/applications/", json=config).status_code == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = api.get("/api/serve/applications/").json()["applications"]["models"]
            if status["status"] == "RUNNING" and status["deployments"]["ModelServer"]["status"] == "HEALTHY":
                return
            time.sleep(0.5)
    pytest.fail(f"the ingress did not settle at two replicas: {status}")


def shed_count(cluster, protocol: str, outcome: str) -> float:
    return cluster.metric_total("ray_serve_app_requests_total", application="models", protocol=protocol,
                                outcome=outcome)


def counted(cluster, protocol: str, before: dict[str, float], expected: int | None) -> dict[str, float]:
    """The server's count of this protocol's requests by outcome since ``before``, once the
    metrics have caught up (with ``expected`` answers in all, when given)."""
    deadline = time.monotonic() + 20
    previous = None
    while True:
        now = {o: shed_count(cluster, protocol, o) - before[o] for o in before}
        settled = now == previous if expected is None else sum(now.values()) >= expected
        if settled or time.monotonic() > deadline:
            return now
        previous = now
        time.sleep(1.5)


def admission(cluster) -> AdmissionSpec:
    app = next(a for a in cluster.config["applications"] if a["name"] == "models")
    return AdmissionSpec.model_validate(app["args"].get("admission", {}))


def grpc_infer_once(channel: grpc.Channel, request, timeout: float = 30) -> grpc.StatusCode:
    call = channel.unary_unary(GRPC_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
    try:
        call.with_call(pb.ModelInferRequest.FromString(request.body[5:]), timeout=timeout,
                       metadata=list(MAIN.items()))
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


class Sampler:
    """A few ordinary clients' requests in the middle of the overload, answers kept whole: what
    a refused client sees (h2load keeps statuses and latencies only). Their clients are made
    before the window: an httpx client per request (its TLS context) cost this process a quarter
    of a core in the window, on the cores the server runs on."""

    COUNT = 40

    def __init__(self, send, count: int = COUNT):
        self.send, self.count, self.answers = send, count, []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        time.sleep(WARMUP_S + 1)
        with ThreadPoolExecutor(self.count) as pool:
            self.answers = list(pool.map(lambda _: self.send(), range(self.count)))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()


def post_http(client: httpx.Client, url: str, request):
    try:
        return client.post(url + request.path, content=request.body, headers=request.headers, timeout=30)
    except httpx.HTTPError as error:
        return error


@pytest.mark.serve
@pytest.mark.slow
def test_overload_is_shed_and_the_accepted_requests_stay_fast(serve_cluster, tmp_path):
    require_tool("h2load")
    pinned_to_two_ingress_replicas(serve_cluster)
    figures = {}
    for protocol, h1, url, request, extra in (
            ("v2", True, serve_cluster.url, v2_json("iris", features("iris", 1)), {}),
            ("grpc", False, f"http://{serve_cluster.grpc_target}", grpc_infer("iris", features("iris", 1)), MAIN)):
        outcomes = ("ok", "client_error", "server_error", "shed")
        before = {o: shed_count(serve_cluster, protocol, o) for o in outcomes}
        sized = h2load(url, request, SIZED, tmp_path, h1=h1, extra_headers=extra)
        sized_counts = counted(serve_cluster, protocol, before, None)
        before = {o: shed_count(serve_cluster, protocol, o) for o in outcomes}
        with httpx.Client(limits=httpx.Limits(max_connections=Sampler.COUNT)) as client, \
                grpc.insecure_channel(serve_cluster.grpc_target) as channel:
            send = (lambda: post_http(client, serve_cluster.url, request)) if h1 else (
                lambda: grpc_infer_once(channel, request))
            with Sampler(send) as sampler:
                over = h2load(url, request, OVERLOAD, tmp_path, h1=h1, extra_headers=extra)
            after = send()
        counts = counted(serve_cluster, protocol, before, None)  # warm-up included: h2load logs none of it

        statuses = Counter(status for _, status, _ in over.rows)
        if h1:
            def accepted_call(status, latency):
                return status == "200"
            samples = [(a.status_code, a.headers.get("retry-after"), a.json().get("reason") if a.status_code != 200
                        else None) for a in sampler.answers if isinstance(a, httpx.Response)]
        else:  # every gRPC call is an HTTP 200, its gRPC status unseen by h2load; a refusal comes
            # refuse_after_s after arrival and an accepted call within max_wait_s and its own time
            refused_at = 0.95 * admission(serve_cluster).refuse_after_s

            def accepted_call(status, latency):
                return status == "200" and latency < refused_at
            samples = [(a.name,) for a in sampler.answers]
        accepted = [lat for _, status, lat in over.rows if accepted_call(status, lat)]
        shed = len(over.rows) - len(accepted) - sum(statuses[f] for f in FAILED)
        goodput = over.answered_per_s(accepted_call)
        sized_rate = sized.answered_per_s(lambda status, latency: status == "200")
        slow = sum(1 for lat in accepted if lat > ACCEPTED_P99_S[protocol])
        figures[protocol] = {
            "sized_rps": round(sized_rate), "overload_goodput_rps": round(goodput),
            "ratio": round(goodput / sized_rate, 2), "accepted_p50_ms": round(1000 * percentile(accepted, 50)),
            "accepted_p99_ms": round(1000 * percentile(accepted, 99)), "requests": len(over.rows),
            "shed": shed, "timeouts": over.timeouts(), "counted": {k: int(v) for k, v in counts.items()},
            "samples": dict(Counter(samples))}
        print(f"\noverload {protocol}: {figures[protocol]}")

        # the sized load: every answer a 200; a stream h2load saw fail counts as a socket timeout (<= 1 %)
        assert sized.timeouts() <= 0.01 * len(sized.rows), sized.timeouts()
        assert set(Counter(st for _, st, _ in sized.rows)) - FAILED == {"200"}
        assert sized_counts["ok"] >= len(sized.rows) and sized_counts["shed"] == 0, sized_counts
        assert set(statuses) - FAILED <= {"200", "503"}, statuses  # no 500 from HAProxy, no 408 from Serve
        assert over.timeouts() <= 0.01 * len(over.rows), figures[protocol]
        assert goodput >= GOODPUT_FLOOR[protocol] * sized_rate, figures[protocol]
        assert slow <= 0.01 * len(accepted), figures[protocol]  # accepted p99 within the bound
        # Every answer was ours and counted: OK or shed, nothing else (Serve's own refusals are not
        # counted); the server saw more than h2load logged (the warm-up), never fewer.
        assert counts["client_error"] == counts["server_error"] == 0, counts
        assert counts["ok"] >= len(accepted) and counts["shed"] >= shed > 0, (counts, shed)
        # An ordinary client's answers are 200 or the JSON refusal. It is seldom refused: a freed slot
        # goes to the newest waiter, and it sends one request at a time (shedding is shown above).
        if h1:
            assert samples and all(s == (200, None, None) or s == (503, "1", "overloaded") for s in samples), samples
            assert after.status_code == 200, after
        else:
            assert set(samples) <= {("OK",), ("UNAVAILABLE",)}, samples
            assert after == grpc.StatusCode.OK
