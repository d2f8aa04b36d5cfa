"""The batch-scoring RayJob (cluster/jobs/batch-score), rendered by ``kubectl kustomize`` and
checked as tests/test_manifests.py checks the RayService: against the KubeRay RayJob CRD's schema
(strictly) and its CEL rules, sized like its workers, locked down the same way, and running a
``serve-app score`` command line that parses. Its image and Ray version are checked with the
RayService's in tests/test_manifests.py (``test_the_batch_score_rayjob_follows_the_pins_too``).
"""

from __future__ import annotations

import shlex
from functools import lru_cache

import pytest

from serve_app.tools import cli, manifests
from serve_app.tools.container import WRITABLE_PATHS
from test_manifests import CLUSTER, quantity, rayservice, validation_errors
from test_manifests_cel import rule_failures

JOB = CLUSTER / "jobs" / "batch-score"


@lru_cache(maxsize=1)
def rendered_job() -> tuple:
    from conftest import require_tool

    require_tool("kubectl")
    return tuple(manifests.render(JOB))


def the_job() -> dict:
    # The settings ConfigMap and the version stand-in are local-config: never rendered.
    assert sorted(o["kind"] for o in rendered_job()) == ["NetworkPolicy", "RayJob"]
    return next(o for o in rendered_job() if o["kind"] == "RayJob")


def templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    found = {"submitter": job["spec"]["submitterPodTemplate"], "head": cluster["headGroupSpec"]["template"]}
    found.update({f"worker group {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return found


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_rayjob_renders_and_passes_the_crd_schema_and_its_cel_rules():
    job = the_job()
    assert [e for obj in rendered_job() for e in validation_errors(obj)] == []
    assert rule_failures(job) == []
    assert rule_failures(job, old=job) == []  # an update to itself (the transition rules)
    assert job["metadata"]["namespace"] == "serve-app"


def test_the_submitter_reaches_the_jobs_dashboard_through_the_network_policies():
    """The base's policy admits only Ray Pods to Ray Pods; the job's own admits its submitter."""
    from test_manifests import Pod, admitted, kuberay_pod_labels, policies_of

    job = the_job()
    template = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    head = Pod("serve-app", kuberay_pod_labels(template, "serve-app-batch-score-x1", "head", "headgroup"),
               {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]})
    submitter = Pod("serve-app", job["spec"]["submitterPodTemplate"]["metadata"]["labels"], {})
    base = policies_of("dev")
    assert not admitted(base, submitter, head, 8265)
    assert admitted([*base, *(o for o in rendered_job() if o["kind"] == "NetworkPolicy")], submitter, head, 8265)


def test_the_entrypoint_is_a_score_command_reading_its_settings_from_the_heads_environment(monkeypatch):
    job = the_job()
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    head_env = env_of(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    settings = manifests.yaml.safe_load((JOB / "job-settings.yaml").read_text())["data"]
    assert {k: head_env[k] for k in settings} == settings
    for name, value in head_env.items():
        monkeypatch.setenv(name, value)
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["serve-app", "score"]
    import argparse

    parser = argparse.ArgumentParser()
    cli._add_score(parser.add_subparsers())
    args = parser.parse_args(command[1:])
    assert (args.model, args.input, args.output, args.address) == (
        settings["SERVE_APP_SCORE_MODEL"], settings["SERVE_APP_SCORE_INPUT"], settings["SERVE_APP_SCORE_OUTPUT"], "auto")
    # Every Ray container reads the store and the S3 credentials, as the RayService's do.
    for name, template in templates(job).items():
        if name == "submitter":
            continue
        (container,) = template["spec"]["containers"]
        assert env_of(container)["SERVE_APP_STORE"] == settings["SERVE_APP_STORE"], name
        assert {"secretRef": {"name": "serve-app-s3", "optional": True}} in container["envFrom"], name


def test_workers_are_sized_like_the_rayservices_and_pods_are_locked_down():
    job = the_job()
    service_workers = {c["name"]: c["resources"] for g in rayservice("dev")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                       for c in g["template"]["spec"]["containers"]}
    problems = []
    for name, template in templates(job).items():
        pod = template["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts the service-account token")
        if pod["securityContext"].get("runAsNonRoot") is not True:
            problems.append(f"{name}: may run as root")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            where = f"{name} / {c['name']}"
            security = c.get("securityContext", {})
            if security.get("readOnlyRootFilesystem") is not True or security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: writable root or privilege escalation")
            if name.startswith("worker") and c["resources"] != service_workers["ray-worker"]:
                problems.append(f"{where}: {c['resources']} is not the RayService workers' {service_workers['ray-worker']}")
            mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
            for path in WRITABLE_PATHS:
                size = mounts.get(path, {}).get("emptyDir", {}).get("sizeLimit")
                if size is None:
                    problems.append(f"{where}: no bounded emptyDir at {path}")
                elif quantity(size) > quantity(c["resources"]["limits"]["ephemeral-storage"]):
                    problems.append(f"{where}: {path} may outgrow the ephemeral-storage limit")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("field", ["rayVersion", "image"])
def test_a_broken_rayjob_is_rejected(field):
    """The checks above can fail: a missing version or a wrong type is refused by the schema."""
    import copy

    job = copy.deepcopy(the_job())
    if field == "rayVersion":
        job["spec"]["rayClusterSpec"]["rayVersion"] = 2.6
    else:
        job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = ["x"]
    assert validation_errors(job)
