"""Losing the head node, as the prod overlay's GCS fault tolerance promises to survive it.

The prod overlay's RayCluster runs locally (tests/local_cluster.py): a head with ``num-cpus 0``
and GCS fault tolerance on a real Redis (Debian's redis-server; the head's ``RAY_REDIS_ADDRESS``,
``--redis-password`` and storage namespace, the workers' 600 s GCS reconnect timeout, as KubeRay
sets them), two workers, serveConfigV2 PUT to the dashboard's Serve REST API. Clients send
requests through a worker's ingress (the serve Service leaves the head out) while every process
of the head is SIGKILLed (GCS, raylet, dashboard, the Serve controller, the head's HAProxy) and,
after a downtime shorter than the workers' reconnect timeout, the head is started again with the
same command, as the head Pod's container would be. As soon as Serve has recovered, a config
change is PUT, as the operator PUTs serveConfigV2 once the head Pod is ready: iris version 2
through the ingress's ``user_config`` (serve_app.config.Rollout), which Serve applies to the
running replicas. It must roll out with no more than 1 % of the requests failing and no replica
restarted. (A change of the application's ``args`` instead rebuilds the application; while the
build runs, Ray 2.60 gives every HAProxy no replica of it, only the head's fallback proxy as a
backup, and a restarted head has none until Serve has started it again: half the requests
failed that way.) The figures are printed with ``-s`` (docs/reliability-security.md#head-node-loss).

The contrast runs last on the same cluster: the head killed again and restarted without its
Redis, which is what a head restart is for a cluster without GCS fault tolerance (a GCS that kept
its tables in memory starts empty).
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
import time

import httpx
import pytest

from conftest import SteadyLoad
from local_cluster import LocalCluster, prod_like_cluster, redis_server, wait_for
from serve_app.store import ModelStore
from serve_app.tools.train import train_model

pytestmark = [pytest.mark.serve, pytest.mark.slow]

HEAD_DOWN_S = 15  # well below the workers' reconnect timeout (600 s with KubeRay, 60 s Ray's default)
IRIS = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [[5.1, 3.5, 1.4, 0.2]]}]}
RECOVERY_TIMEOUT_S = 180
FT_ENV = ("RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "RAY_external_storage_namespace")
INGRESS = "models/ModelServer"  # replica_ids' key of the application's ingress deployment


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("head-loss")
    with redis_server(work, secrets.token_hex(16)) as redis, prod_like_cluster(work, redis) as local:
        yield local


def replica_ids(cluster: LocalCluster) -> dict[str, set[str]]:
    apps = cluster.applications()["applications"]
    return {f"{app}/{name}": {r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
            for app, a in apps.items() for name, d in a["deployments"].items()}


def gcs_up(cluster: LocalCluster) -> bool:
    try:
        return httpx.get(f"{cluster.dashboard}/api/gcs_healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def worker_ingress(cluster: LocalCluster):
    return next(n for n in cluster.serving if n.role != "head")


def test_with_redis_the_workers_serve_through_a_head_loss_and_serve_recovers(cluster):
    namespace = cluster.head.env["RAY_external_storage_namespace"]
    assert cluster.redis.keys(f"*{namespace}*"), "the GCS keeps nothing in Redis"
    before = cluster.applications()
    replicas_before = replica_ids(cluster)
    workers_before = {n["node_id"] for n in cluster.alive_nodes() if n["node_id"] != before["controller_info"]["node_id"]}
    worker = worker_ingress(cluster)

    with SteadyLoad(worker.url, "/v2/models/iris/infer", IRIS) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        assert cluster.head.kill(), "found no process of the head"
        assert not gcs_up(cluster)
        time.sleep(HEAD_DOWN_S - (time.monotonic() - killed_at))
        restarted_at = time.monotonic()
        cluster.restart_head()  # the same command, the same Redis

        def recovered() -> bool:  # Serve's applications RUNNING, from the restarted controller
            return cluster.all_running() and replica_ids(cluster) == replicas_before

        wait_for("the Serve controller on the restarted head", recovered, RECOVERY_TIMEOUT_S, 0.5)
        back_at = time.monotonic()
        after = cluster.applications()

        # A config change right after the recovery, PUT as the operator does when the head Pod is
        # ready: iris version 2, rolled out through the ingress's user_config (a reconfigure of the
        # running replicas, so no application rebuild and no detour through the head's proxy).
        train_model("iris", ModelStore(str(cluster.store)), version="2", C=0.5)
        changed = copy.deepcopy(cluster.deployed)
        ingress = next(d for d in changed["applications"][0]["deployments"] if d["name"] == "ModelServer")
        ingress["user_config"] = {"models": {"iris": {"version": "2"}}}
        fallback_up_at_put = cluster.fallback_up(worker)
        put_at = time.monotonic()
        cluster.deploy(changed)

        def rolled_out() -> bool:  # iris v2 answering from the same ingress replicas
            return (replica_ids(cluster)[INGRESS] == replicas_before[INGRESS] and len(load.outcomes) > 20
                    and all(o.ok and o.body["model_version"] == "2" for o in load.outcomes[-20:]))

        wait_for("iris version 2 rolled out through the worker", rolled_out, 2 * RECOVERY_TIMEOUT_S, 0.5)
        changed_at = time.monotonic()
        time.sleep(2)

    down = [o for o in load.outcomes if killed_at <= o.at < back_at]
    after_back = load.since(back_at)
    failed_down = [o for o in down if not o.ok]
    versions = [o.body["model_version"] for o in after_back if o.ok]
    rollout = [o for o in after_back if put_at <= o.at < changed_at]
    failed_rollout = [o for o in rollout if not o.ok]
    print(f"\nhead loss with Redis: head down {restarted_at - killed_at:.1f} s; controller back with the same "
          f"apps {back_at - restarted_at:.1f} s after the restart ({back_at - killed_at:.1f} s after the kill); "
          f"{len(failed_down)}/{len(down)} requests failed through the worker meanwhile; after it "
          f"{sum(not o.ok for o in after_back if o.at < put_at)}/{sum(o.at < put_at for o in after_back)} failed "
          f"before the config change (PUT at once; the head's fallback proxy {'UP' if fallback_up_at_put else 'not UP'} "
          f"in the worker's HAProxy then), {len(failed_rollout)}/{len(rollout)} during its rollout "
          f"(statuses {sorted({o.status for o in rollout if not o.ok})}), "
          f"{sum(not o.ok for o in load.since(changed_at))}/{len(load.since(changed_at))} after it; "
          f"rolled out (iris v2 answering from the same ingress replicas) {changed_at - put_at:.1f} s after the PUT")
    assert len(failed_down) <= 0.01 * len(down), failed_down[:5]
    assert versions[0] == "1" and versions[-1] == "2"
    # Recovered, not redeployed: the same applications and configs, the same replicas, on the
    # same worker nodes, with the controller on the new head.
    assert {n: a["deployed_app_config"] for n, a in after["applications"].items()} == {
        n: a["deployed_app_config"] for n, a in before["applications"].items()}
    assert after["controller_info"]["node_id"] != before["controller_info"]["node_id"]
    assert workers_before <= {n["node_id"] for n in cluster.alive_nodes()}
    # After the recovery every request is answered, before the config change and once it has rolled
    # out, and during the rollout no more than 1 % fail.
    settled = [o for o in after_back if o.at < put_at or o.at >= changed_at]
    assert settled and all(o.ok for o in settled), [o for o in settled if not o.ok][:5]
    assert rollout and len(failed_rollout) <= 0.01 * len(rollout), (len(failed_rollout), failed_rollout[:5])


def test_without_redis_a_restarted_head_forgets_serve_and_the_workers(cluster):
    """The contrast (runs last): the head restarted without its Redis starts an empty GCS. It has
    no Serve application, no controller, and it does not know the workers."""
    worker = worker_ingress(cluster)
    workers = [n["node_id"] for n in cluster.alive_nodes() if n["is_head_node"] is False]
    no_redis = dataclasses.replace(
        cluster.head, env={k: v for k, v in cluster.head.env.items() if k not in FT_ENV},
        flags={k: v for k, v in cluster.head.flags.items() if k != "redis-password"})
    with SteadyLoad(worker.url, "/v2/models/iris/infer", IRIS) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        assert cluster.head.kill()
        time.sleep(HEAD_DOWN_S - (time.monotonic() - killed_at))
        restarted_at = time.monotonic()
        cluster.restart_head(no_redis)
        up_at = time.monotonic()
        apps = cluster.applications()
        time.sleep(10)
        nodes = cluster.alive_nodes()
        raylets = [p for n in cluster.nodes[1:] for p in n.processes() if p.name() == "raylet"]

    print(f"\nhead loss without Redis: GCS up {up_at - restarted_at:.1f} s after the restart; applications "
          f"{apps.get('applications')}; alive nodes {len(nodes)}; worker raylets left {len(raylets)}; "
          f"requests through the worker after the restart: "
          f"{sum(not o.ok for o in load.since(restarted_at))}/{len(load.since(restarted_at))} failed")
    assert not apps.get("applications")
    assert not {n["node_id"] for n in nodes} & set(workers)
