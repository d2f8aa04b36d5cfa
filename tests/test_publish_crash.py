"""Publishing never serves half a model: a publishing process killed at the worst moments
(its artifact written and its metadata not; its metadata half written) leaves nothing a reader
lists or loads, and the next publish succeeds; locally and on S3 (a real moto server), and
live, while clients query ``latest``, numbered versions and new long-tail models.

The publisher is a real process (``PUBLISHER`` below) that forks one child per publish; a child
told to die arms itself by wrapping ``os.link``/``os.write`` (local) or botocore's send (S3)
and SIGKILLs itself there, so the product runs its ordinary code up to the kill. Each published
model predicts a constant of its own, so every answer names the version it came from.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import FLEET, ROOT
from serve_app.metadata import METADATA_FILE
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore, NotInStore

PUBLISHER = r'''
import json, os, signal, socket, sys, traceback
from urllib.parse import urlsplit

import boto3, httpx, numpy as np, pandas as pd  # imported once, before forking
from sklearn.dummy import DummyRegressor

from serve_app import publish
from serve_app.metadata import METADATA_FILE
from serve_app.store import ModelStore

plan, results = json.load(open(sys.argv[1])), sys.argv[2]
X = pd.DataFrame({"x": np.linspace(0.0, 1.0, 8)})


def record(entry):
    with open(results, "a") as out:
        out.write(json.dumps(entry) + "\n")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm_local(kill):
    real_link, real_write = os.link, os.write

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        if kill == "after_artifact" and not str(dst).endswith(METADATA_FILE):
            die()  # the artifact is in place, the metadata not begun

    def write(fd, data):
        if kill == "mid_metadata" and f".{METADATA_FILE}." in os.readlink(f"/proc/self/fd/{fd}"):
            real_write(fd, bytes(data[: len(data) // 2]))
            die()  # half the metadata document written
        return real_write(fd, data)

    os.link, os.write = link, write


def arm_s3(client, kill):
    def send(request, **_):
        url = urlsplit(request.url)
        if not url.path.endswith("/" + METADATA_FILE):
            return None
        if kill == "mid_metadata":  # the real signed PUT, cut off halfway through its body
            body = request.body if isinstance(request.body, bytes) else request.body.read()
            head = "".join(f"{k}: {v.decode() if isinstance(v, bytes) else v}\r\n" for k, v in request.headers.items())
            conn = socket.create_connection((url.hostname, url.port))
            conn.sendall(f"PUT {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n{head}\r\n".encode() + body[: len(body) // 2])
        die()

    client.meta.events.register("before-send.s3.PutObject", send)


def publish_step(store_uri, step):
    store = ModelStore(store_uri)
    if step.get("kill"):
        if store_uri.startswith("s3://"):
            arm_s3(store.backend.client, step["kill"])
        else:
            arm_local(step["kill"])
    model = DummyRegressor(strategy="constant", constant=float(step["uid"])).fit(X, np.zeros(len(X)))
    meta = publish(model, step["name"], X, store=store)
    record({"i": step["i"], "version": meta.version})


for run in plan:
    for step in run["steps"]:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                publish_step(run["store"], step)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        entry = {**step, "outcome": "killed" if killed else "ok" if os.waitstatus_to_exitcode(status) == 0 else "failed"}
        if entry["outcome"] == "ok" and step.get("reloads"):  # move every replica's "latest"
            entry["reload"] = httpx.post(f"{run['reload_url']}/v2/repository/models/{step['name']}/load",
                                         timeout=60).status_code
        record(entry)
'''


def start_publisher(tmp_path: Path, plan: list[dict], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    script, plan_file, results = tmp_path / "publisher.py", tmp_path / "plan.json", tmp_path / "results.jsonl"
    script.write_text(PUBLISHER)
    plan_file.write_text(json.dumps(plan))
    results.touch()
    proc = subprocess.Popen([sys.executable, str(script), str(plan_file), str(results)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return proc, results


def outcomes(results: Path) -> dict[int, dict]:
    """Each step's outcome, with its version when it was published (complete lines only)."""
    steps: dict[int, dict] = {}
    for line in results.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            entry = json.loads(line)
            steps.setdefault(entry["i"], {}).update(entry)
    return steps


def steps_for(name: str, kills: list[str | None], first_uid: int = 0, reloads: bool = False) -> list[dict]:
    return [{"i": first_uid + i, "name": name, "uid": 1000 + first_uid + i, "kill": kill, "reloads": reloads}
            for i, kill in enumerate(kills)]


def predicted(store: ModelStore, name: str, version: str | None = None) -> float:
    return float(load_runtime(store, name, version).predict(np.zeros((1, 1)))[0])


# -- store level: a killed publisher, local and S3 ------------------------------------------------
KILLS = [None, "after_artifact", "mid_metadata", None]


def test_a_killed_publish_leaves_nothing_visible_and_the_next_one_succeeds(tmp_path, s3_bucket):
    client, bucket = s3_bucket
    local, s3 = ModelStore(str(tmp_path / "store")), ModelStore(f"s3://{bucket}/team")
    started = time.monotonic()
    proc, results = start_publisher(tmp_path, [{"store": local.uri, "steps": steps_for("m", KILLS)},
                                               {"store": s3.uri, "steps": steps_for("m", KILLS, 10)}])
    assert proc.wait(timeout=120) == 0
    done = outcomes(results)
    for first, store in ((0, local), (10, s3)):
        assert [done[first + i]["outcome"] for i in range(4)] == ["ok", "killed", "killed", "ok"], done
        # Version 2 holds a dead publish's artifact, 3 its half metadata: neither is a version;
        # the publish after them took the next free number and is "latest".
        assert [done[first]["version"], done[first + 3]["version"]] == ["1", "4"]
        assert store.versions("m") == ["1", "4"] and store.list_models() == {"m": ["1", "4"]}
        assert store.read_metadata("m").version == "4"
        assert predicted(store, "m") == 1000 + first + 3 and predicted(store, "m", "1") == 1000 + first
        for slot in ("2", "3"):
            with pytest.raises(NotInStore):
                store.read_metadata("m", slot)

    slot2, slot3 = tmp_path / "store" / "m" / "2", tmp_path / "store" / "m" / "3"
    assert "model.skops" in os.listdir(slot2) and METADATA_FILE not in os.listdir(slot2)
    half = [p for p in slot3.iterdir() if p.name.startswith(f".{METADATA_FILE}.")]
    assert len(half) == 1 and METADATA_FILE not in os.listdir(slot3)  # the kill came mid-write...
    whole = (tmp_path / "store" / "m" / "4" / METADATA_FILE).stat().st_size
    assert 0 < half[0].stat().st_size < whole  # ...after some bytes, and those were never read
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {k for k in keys if k.startswith(("team/m/2/", "team/m/3/"))} == {"team/m/2/model.skops",
                                                                           "team/m/3/model.skops"}
    print(f"\nkilled publishes, local and S3: {time.monotonic() - started:.1f} s")


# -- live: publishing (and dying) under load ------------------------------------------------------
# One row for the models below (one float feature), in the V2 form: its answer names the version.
V2_ROW = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [0.5]}]}
LIVE_KILLS = [None, None, "after_artifact", None, "mid_metadata", None, "after_artifact", "mid_metadata", None, None]
NEW_KILLS = [None, "after_artifact", None, "mid_metadata", None]


@pytest.mark.serve
def test_publishing_under_load_never_serves_half_a_model(serve_cluster, tmp_path):
    """Versions of one model published (some killed mid-write) with a reload after each, and new
    long-tail models, while four clients ask for latest, numbered versions and the new names:
    no 5xx, and every answer is a complete version's own prediction."""
    store = ModelStore(str(serve_cluster.store.parent / "fleet_store"))
    url = serve_cluster.url + FLEET
    name = f"crash-{uuid.uuid4().hex[:6]}"
    new = [f"{name}-new{k}" for k in range(len(NEW_KILLS))]
    tail = [{"i": 100 + k, "name": new[k], "uid": 5000 + k, "kill": kill} for k, kill in enumerate(NEW_KILLS)]
    steps = [step for k, main in enumerate(steps_for(name, LIVE_KILLS, reloads=True)) for step in [main, *tail[k:k + 1]]]
    started = time.monotonic()
    proc, results = start_publisher(tmp_path, [{"store": store.uri, "steps": steps, "reload_url": url}])

    answers: list[tuple[str, str, int, str | None, float | None, str | None]] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        draw = random.Random(seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                kind = draw.choice(["latest", "latest", "version", "new"])
                model = draw.choice(new) if kind == "new" else name
                path = (f"/v2/models/{model}/versions/{draw.randint(1, len(LIVE_KILLS) + 1)}/infer"
                        if kind == "version" else f"/v2/models/{model}/infer")
                try:
                    reply = http.post(path, json=V2_ROW)
                except httpx.HTTPError as exc:
                    answers.append((kind, model, 0, None, None, repr(exc)))
                    continue
                body = reply.json()
                ok = reply.status_code == 200
                answers.append((kind, model, reply.status_code, body["model_version"] if ok else None,
                                body["outputs"][0]["data"][0] if ok else None, body.get("reason")))

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(4)]
    try:
        # Clients start once the model has a version (a name asked for before it exists is
        # remembered as absent for a few seconds, and a reload of it would be a 404 meanwhile).
        while 0 not in outcomes(results) and proc.poll() is None:
            time.sleep(0.2)
        for thread in threads:
            thread.start()
        assert proc.wait(timeout=120) == 0
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
    done = outcomes(results)
    published = {(s["name"], s["version"]): s["uid"] for s in done.values() if s["outcome"] == "ok"}
    killed = [s for s in done.values() if s["outcome"] == "killed"]
    summary = [(s["i"], s.get("kill"), s.get("outcome"), s.get("version"), s.get("reload")) for s in done.values()]
    assert len(done) == len(steps) and {s.get("outcome") for s in done.values()} == {"ok", "killed"}, summary
    assert len(killed) == sum(kill is not None for kill in LIVE_KILLS + NEW_KILLS)
    assert all(s.get("reload") == 200 for s in done.values() if s["outcome"] == "ok" and s["name"] == name), summary
    # The publishes after each kill succeeded, on the next free numbers: ten steps, six versions.
    assert store.versions(name) == sorted({v for (n, v) in published if n == name}, key=int)
    assert len(store.versions(name)) == LIVE_KILLS.count(None)

    errors = [a for a in answers if a[2] not in (200, 404)]
    assert not errors, errors[:5]
    assert all(a[5] == "model_not_found" for a in answers if a[2] == 404)
    served = [a for a in answers if a[2] == 200]
    wrong = [a for a in served if published.get((a[1], a[3])) != a[4]]
    assert not wrong, wrong[:5]  # every answer: a complete version's own prediction
    latest_versions = {a[3] for a in served if a[0] == "latest"}
    assert len(latest_versions) >= 2, latest_versions  # "latest" moved under load

    # Afterwards: latest is the last version, each new model that was published answers, and a
    # killed publish is nowhere (its name absent, its version number a 404).
    with httpx.Client(base_url=url, timeout=30) as http:
        last = http.post(f"/v1/models/{name}:predict", json={"instances": [[0.5]]})
        assert last.headers["x-model-version"] == store.versions(name)[-1]
        assert last.json()["predictions"] == [published[(name, store.versions(name)[-1])]]
        for k, model in enumerate(new):
            deadline = time.monotonic() + 8  # a name asked for before it existed is absent for 5 s
            reply = http.post(f"/v1/models/{model}:predict", json={"instances": [[0.5]]})
            while reply.status_code == 404 and NEW_KILLS[k] is None and time.monotonic() < deadline:
                time.sleep(0.5)
                reply = http.post(f"/v1/models/{model}:predict", json={"instances": [[0.5]]})
            if NEW_KILLS[k] is None:
                assert reply.status_code == 200 and reply.json()["predictions"] == [5000 + k], reply.text
            else:
                assert reply.status_code == 404 and reply.json()["reason"] == "model_not_found", reply.text
        holes = sorted({int(p.name) for p in (Path(store.uri) / name).iterdir()} - {int(v) for v in store.versions(name)})
        for hole in holes:
            assert http.post(f"/v1/models/{name}/versions/{hole}:predict",
                             json={"instances": [[0.5]]}).status_code == 404
    print(f"\n{len(answers)} answers ({len(served)} 200, {len(answers) - len(served)} 404, 0 5xx) over "
          f"{len(published)} published versions and {len(killed)} killed publishes; latest answered from "
          f"{sorted(latest_versions, key=int)}; {time.monotonic() - started:.1f} s")
