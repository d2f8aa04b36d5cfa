"""The notebooks in notebooks/ are a product surface: each is executed here, top to bottom, in a
real Jupyter kernel (nbclient), with its own in-process Ray and Serve on free ports. A notebook's
own ``assert`` cells (served predictions equal the stored model's, no failed request during a
redeploy, ...) are what fail the test; an executed copy, plots included, is left in tmp_path.

Each run must leave nothing behind: every process the kernel starts inherits its
``NB_RAY_TEMP_DIR``, so leftovers are found by that marker, ended, and reported as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT, free_port
from serve_app.tools.localserve import FAST_PATH_ENV, haproxy_paths

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; a hung cell fails the test instead of hanging the suite


def _ids(paths):
    return [p.stem for p in paths]


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_iterate.ipynb", "03_your_model.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path):
    """Outputs stay out of git so diffs show code; clear them before committing (docs/notebooks.md)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: cell {cell.id} has outputs; run "
                f"`jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)}`")
        assert not cell.metadata.get("execution"), f"{path.name}: cell {cell.id} keeps execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_uses_public_api_only(path):
    """Notebooks show users the project's API: no private names, no copies of its internals."""
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    imports = re.findall(r"^\s*(?:from\s+(\S+)\s+import\s+(.+)|import\s+(\S+))", source, re.M)
    for module, names, plain in imports:
        dotted = module or plain
        assert not any(part.startswith("_") for part in dotted.split(".")), f"{path.name} imports {dotted}"
        assert not any(n.strip().startswith("_") for n in names.split(",")), f"{path.name}: from {module} import {names}"
    assert "_private" not in source


def _processes_started_for(marker: str) -> list[psutil.Process]:
    """Processes whose environment carries this run's marker: the kernel and all it started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("NB_RAY_TEMP_DIR") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.serve
@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, tmp_path, monkeypatch):
    # Short and private: Ray's socket paths must stay under 107 bytes, and this run's processes
    # are recognised by it (never a colleague's Ray or a `make serve` beside the suite).
    ray_temp = tempfile.mkdtemp(prefix="nb-", dir="/tmp")
    env = {
        "NB_HTTP_PORT": free_port(),
        "NB_METRICS_PORT": free_port(),
        "NB_STORE": tmp_path / "model_store",
        "NB_RAY_TEMP_DIR": ray_temp,
        # HAProxy's own ports and files, and Serve's fallback proxy's ports, as the serve fixture
        # has them: nothing shared with a `make serve` or another suite's Ray on this machine.
        "RAY_SERVE_HAPROXY_STATS_PORT": free_port(),
        "RAY_SERVE_HAPROXY_METRICS_PORT": free_port(),
        **haproxy_paths(Path(ray_temp)),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": free_port(),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": free_port(),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        # The fast path, as `make serve` and `make jupyter` run it.
        **FAST_PATH_ENV,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))  # the kernel, and Ray under it, inherit the environment

    try:
        for attempt in (1, 2):
            nb = nbformat.read(path, as_version=4)
            client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                    resources={"metadata": {"path": str(path.parent)}})
            try:
                client.execute()
                break
            except CellExecutionError as exc:
                # Ray waits a fixed 30 s for its own raylet to register; on a loaded 2-core
                # machine ray.init can give up before that. Only this infrastructure failure
                # earns one fresh retry (its half-started processes are ended first); any other
                # failure, the notebook's own assertions included, fails the test.
                if attempt == 2 or RAY_STARTUP_TIMEOUT not in str(exc):
                    raise
                _leftover_processes(ray_temp)
            finally:
                nbformat.write(nb, tmp_path / path.name)  # executed copy: outputs and plots
    finally:
        leftovers = _leftover_processes(ray_temp)
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert not leftovers, f"{path.name} left processes running: {leftovers}"


RAY_STARTUP_TIMEOUT = "The current node timed out during startup"


def _leftover_processes(marker: str, grace_s: float = 15) -> list[str]:
    """This run's processes still alive after ``grace_s``: described, then ended."""
    _, alive = psutil.wait_procs(_processes_started_for(marker), timeout=grace_s)
    described = []
    for proc in alive:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return described
