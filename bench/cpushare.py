"""Where the CPU goes while a load runs: the share of one core each kind of process used.

Run it beside a load (``make bench`` cell, wrk, locust) on the same machine::

    python -m bench.cpushare --seconds 8

A server that looks slow is often not slow itself: on a small machine the load generator,
HAProxy and Ray's own actors (the HAProxy manager parses one log line per request for Serve's
HTTP metrics; the dashboard agent) take their share of the same cores. Ray workers are named
by their ``ray::`` title (``ray::ServeReplica:<app>:<deployment>``), other processes by their
executable. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path


def _kind(pid: str) -> str | None:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    first = args[0].decode(errors="replace").strip()
    if first.startswith("ray::"):
        return first.split()[0]
    if not first:  # kernel threads
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.index("(") + 1:stat.rindex(")")]
    return os.path.basename(first.split()[0])


def ticks() -> dict[str, tuple[str, int]]:
    """pid -> (kind, user + system clock ticks so far)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kind = _kind(pid)
        if kind is not None:
            found[pid] = (kind, int(fields[11]) + int(fields[12]))
    return found


def cpu_seconds(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds used per process kind between two ``ticks()`` readings."""
    hz, used_by = os.sysconf("SC_CLK_TCK"), Counter()
    for pid, (kind, count) in after.items():
        used = count - before.get(pid, (kind, 0))[1]
        if used > 0:
            used_by[kind] += used / hz
    return dict(used_by.most_common())


def cpu_share(seconds: float) -> dict[str, float]:
    """Cores used per process kind over ``seconds`` (1.0 = one core busy all the time)."""
    before, started = ticks(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = ticks(), time.monotonic() - started
    return {kind: used / elapsed for kind, used in cpu_seconds(before, after).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    shares = cpu_share(args.seconds)
    for kind, cores in list(shares.items())[:args.top]:
        print(f"{cores * 100:6.1f} %  {kind}")
    print(f"{sum(shares.values()) * 100:6.1f} %  all ({os.cpu_count()} cores = {os.cpu_count() * 100} %)")


if __name__ == "__main__":
    main()
