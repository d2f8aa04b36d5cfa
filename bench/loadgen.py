"""Load from wrk (C, event-driven: a few percent of a core at these rates), one fixed request
body per run read from a file by a Lua script, results printed by the script's ``done`` hook
as one JSON line (HdrHistogram percentiles, no text parsing of wrk's report).

gRPC cells: nghttp2's h2load (C, HTTP/2), one stream at a time per connection like wrk, the
framed ModelInfer message as its body; latencies from its per-request log file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.workloads import Request

RESULT_MARK = "BENCH_RESULT "
LUA = """\
wrk.method = "POST"
{headers}
local file = assert(io.open({body_path}, "rb"))
wrk.body = file:read("*a")
file:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{mark}{{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}}\\n', summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for these values


def write_script(request: Request, folder: Path, name: str) -> Path:
    body_path = folder / f"{name}.body"
    body_path.write_bytes(request.body)
    headers = "\n".join(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in request.headers.items())
    script = folder / f"{name}.lua"
    script.write_text(LUA.format(headers=headers, body_path=lua_string(str(body_path)), mark=RESULT_MARK))
    return script


def wrk(url: str, script: Path, connections: int, duration_s: float) -> dict:
    threads = min(2, connections)
    command = [shutil.which("wrk") or "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
               "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(RESULT_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line[len(RESULT_MARK):])
    seconds = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["non_2xx"]
    return {"rps": ok / seconds, "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "max_ms": raw["max_us"] / 1000, "requests": raw["requests"],
            "non_2xx": raw["non_2xx"], "socket_errors": raw["socket_errors"], "seconds": round(seconds, 2)}


def measure(url: str, script: Path, connections: int, duration_s: float, warmup_s: float) -> dict:
    """One cell: a warm-up run (discarded), then the measured run."""
    if warmup_s > 0:
        wrk(url, script, connections, warmup_s)
    return wrk(url, script, connections, duration_s)


def h2load(target: str, request: Request, folder: Path, name: str, connections: int, duration_s: float) -> dict:
    """``connections`` HTTP/2 connections to ``target`` (host:port), each posting ``request`` one
    stream at a time for ``duration_s``; the same figures as :func:`wrk`. h2load sees HTTP
    statuses only: gRPC's own status is in the trailers, so callers check an answer first."""
    body, log = folder / f"{name}.grpc", folder / f"{name}.h2load.log"
    body.write_bytes(request.body)
    log.unlink(missing_ok=True)
    command = [shutil.which("h2load") or "h2load", "-c", str(connections), "-m", "1", "-t", str(min(2, connections)),
               "-D", str(max(1, round(duration_s))), "-d", str(body), f"--log-file={log}"]
    for key, value in request.headers.items():
        command += ["-H", f"{key}: {value}"]
    command.append(f"http://{target}{request.path}")
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"h2load gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    starts = [int(r[0]) for r in rows]
    latencies = sorted(int(r[2]) for r in rows)
    ok = sum(1 for r in rows if r[1] == "200")
    seconds = max(duration_s, (max(starts) - min(starts)) / 1e6)

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] / 1000

    errors = sum(int(n) for n in _h2load_counts(out.stdout, ("failed", "errored", "timeout")))
    return {"rps": ok / seconds, "p50_ms": percentile(50), "p90_ms": percentile(90), "p99_ms": percentile(99),
            "max_ms": latencies[-1] / 1000, "requests": len(rows), "non_2xx": len(rows) - ok,
            "socket_errors": errors, "seconds": round(seconds, 2)}


def _h2load_counts(report: str, names: tuple[str, ...]) -> list[str]:
    """The counts h2load's ``requests:`` line gives for ``names`` ("0 failed, 0 errored, ...")."""
    line = next((ln for ln in report.splitlines() if ln.startswith("requests:")), "")
    parts = dict(reversed(p.strip().split(" ", 1)) for p in line.removeprefix("requests:").split(",") if " " in p.strip())
    return [parts.get(name, "0") for name in names]
