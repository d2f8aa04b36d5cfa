"""bench/cpushare.py: the CPU a process kind used, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cpushare import cpu_share

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")


def test_a_busy_process_is_counted_under_its_kind():
    """A child that spins for the whole window shows up under its executable's name with
    a share of a core; the shares add up to no more than the machine's cores."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        shares = cpu_share(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    kind = os.path.basename(sys.executable)
    assert shares.get(kind, 0) > 0.05, shares
    assert sum(shares.values()) <= os.cpu_count() * 1.05, shares

