"""The Kubernetes manifests, rendered by kustomize and checked against real schemas.

Every overlay (and every optional component, on the overlay it is meant for) is rendered with
``kubectl kustomize``. Every rendered object then validates: a kind whose CRD is in the CRD folder
(KubeRay v1.7.0, prometheus-operator 0.93; ``SERVE_APP_CRD_DIR``, default ``../shared/crds``)
against that CRD's ``openAPIV3Schema``, strictly (unknown fields rejected, as ``kubectl apply``'s
strict field validation does); every other kind with kubernetes-validate, strictly, for a current
Kubernetes; a kind that is neither fails. On top of the schemas: the RayService's serveConfigV2
is configs/serve_config.yaml and validates with Ray Serve's own schema, versions follow the
pins, and the security and KubeRay rules docs/kubernetes.md promises hold.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import IN_CI, require_tool
from serve_app.tools import alert_rules, manifests
from serve_app.tools.localserve import FAST_PATH_ENV

ROOT = manifests.ROOT
CLUSTER = ROOT / "cluster"
CRD_DIR = Path(os.environ.get("SERVE_APP_CRD_DIR", ROOT.parent / "shared" / "crds"))
K8S_VERSION = kubernetes_validate.latest_version()
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# What gets rendered: each overlay as it is, and the optional components on top of the overlay
# they are for (added to `components:`, or swapped for one the overlay lists).
VARIANTS: dict[str, dict] = {
    "dev": {"overlay": "overlays/dev"},
    "prod": {"overlay": "overlays/prod"},
    "dev+ingress+s3-models": {"overlay": "overlays/dev",
                              "add": ["components/ingress", "components/s3-models"]},
    "prod+ingress+s3-models": {"overlay": "overlays/prod",
                               "add": ["components/ingress", "components/s3-models"]},
    "prod+redis-external": {"overlay": "overlays/prod",
                            "swap": {"components/redis": "components/redis-external"}},
}
OVERLAYS = sorted(p.parent.name for p in (CLUSTER / "overlays").glob("*/kustomization.yaml"))


# -- rendering ---------------------------------------------------------------------------------
def _compose(work: Path, overlay: str, add=(), swap=None) -> Path:
    """A copy of ``overlay`` in ``work`` with components added or swapped; paths rewritten."""
    source, target = CLUSTER / overlay, work / overlay.replace("/", "-")
    shutil.copytree(source, target)
    kustomization = yaml.safe_load((source / "kustomization.yaml").read_text())
    swap = {(CLUSTER / old).resolve(): (CLUSTER / new).resolve() for old, new in (swap or {}).items()}
    listed = {(source / ref).resolve() for ref in kustomization.get("components", [])}
    assert set(swap) <= listed, f"{overlay} lists no component {set(swap) - listed} to swap"

    def relocate(ref: str) -> str:
        resolved = (source / ref).resolve()
        resolved = swap.get(resolved, resolved)
        return os.path.relpath(resolved, target) if resolved.is_dir() else ref

    for key in ("resources", "components"):
        kustomization[key] = [relocate(ref) for ref in kustomization.get(key, [])]
    kustomization["components"] += [os.path.relpath(CLUSTER / c, target) for c in add]
    (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return target


@lru_cache(maxsize=None)
def rendered(variant: str) -> tuple:
    require_tool("kubectl")
    spec = VARIANTS[variant]
    if not spec.get("add") and not spec.get("swap"):
        return tuple(manifests.render(CLUSTER / spec["overlay"]))
    work = Path(tempfile.mkdtemp(prefix="kustomize-"))
    try:
        return tuple(manifests.render(_compose(work, spec["overlay"], spec.get("add", ()), spec.get("swap"))))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rayservice(variant: str) -> dict:
    return manifests.the_rayservice(list(rendered(variant)))


def ray_pod_templates(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({f"worker group {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return templates


def pod_templates(objects) -> dict[str, dict]:
    """Every Pod template among the rendered objects, by a readable name."""
    found = {}
    for obj in objects:
        if obj["kind"] == "RayService":
            found.update({f"RayService {k}": v for k, v in ray_pod_templates(obj).items()})
        elif "template" in obj.get("spec", {}):
            found[f"{obj['kind']} {obj['metadata']['name']}"] = obj["spec"]["template"]
    return found


# -- schemas -----------------------------------------------------------------------------------
def _crd_dir() -> Path:
    if not (CRD_DIR / "ray.io_rayservices.yaml").is_file():
        message = f"no CRDs in {CRD_DIR} (set SERVE_APP_CRD_DIR; docs/kubernetes.md)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return CRD_DIR


def _strict(schema):
    """An openAPIV3Schema as the API server applies it: unknown fields are errors (kubectl's
    default strict field validation), and ``nullable`` admits null."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("nullable") and isinstance(schema.get("type"), str):
            schema["type"] = [schema["type"], "null"]
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=1)
def served_crd_schemas() -> dict[tuple[str, str], tuple[str, dict]]:
    """(apiVersion, kind) -> (the CRD's file name, its openAPIV3Schema), for every served
    version of every CRD in the folder."""
    found = {}
    for path in sorted(_crd_dir().glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served"):
                    found[(f"{group}/{version['name']}", kind)] = (path.name, version["schema"]["openAPIV3Schema"])
    return found


@lru_cache(maxsize=1)
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD in the folder."""
    return {key: jsonschema.Draft4Validator(_strict(schema)) for key, (_, schema) in served_crd_schemas().items()}


def validation_errors(obj: dict) -> list[str]:
    """Why ``obj`` would not be accepted: empty when it would."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = f"{kind} {obj.get('metadata', {}).get('name')}"
    # Object names are DNS subdomains: the API server checks that outside any schema.
    errors = [] if _DNS_SUBDOMAIN.fullmatch(str(obj.get("metadata", {}).get("name", ""))) else [
        f"{name}: metadata.name is not a DNS subdomain"]
    validator = crd_validators().get((api_version, kind))
    if validator is not None:
        errors += [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                   for e in validator.iter_errors(obj)]
        # A CRD's schema leaves metadata open; the API server checks it as ObjectMeta.
        stub = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
        return errors + [f"{name}: metadata: {e}" for e in _core_errors(stub)]
    return errors + [f"{name}: {e}" for e in _core_errors(obj)]


def _core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{obj.get('apiVersion')} {obj.get('kind')} is neither a Kubernetes {K8S_VERSION} "
                f"kind nor a custom resource whose CRD is in {CRD_DIR}"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


# -- every overlay renders, and every object in it validates ----------------------------------------
def test_every_overlay_and_component_is_rendered_here():
    """A new overlay or component cannot slip past this file's checks."""
    assert {v["overlay"] for v in VARIANTS.values()} == {f"overlays/{o}" for o in OVERLAYS}
    used = {c for v in VARIANTS.values() for c in [*v.get("add", ()), *v.get("swap", {}).values()]}
    used |= {"components/redis"}  # listed by overlays/prod itself
    components = {f"components/{p.parent.name}" for p in (CLUSTER / "components").glob("*/kustomization.yaml")}
    assert components <= used, f"components no variant renders: {components - used}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_every_object_validates(variant):
    objects = rendered(variant)
    kinds = {o["kind"] for o in objects}
    assert {"RayService", "ServiceAccount", "NetworkPolicy"} <= kinds
    errors = [error for obj in objects for error in validation_errors(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("mutate,expected", [
    (lambda rs: rs["spec"].update(serveConfigv2="typo"), "serveConfigv2"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplicas="two"), "minReplicas"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     ["resources"]["limits"].update(cpu="two"), "two"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["autoscalerOptions"].update(version="v3"), "v3"),
    (lambda rs: rs["metadata"].update(name="Not_A_DNS_Name"), "DNS subdomain"),
    (lambda rs: rs["metadata"].update(labels={"replicas": 2}), "metadata"),
    (lambda rs: rs.update(apiVersion="ray.io/v2"), "neither"),
])
def test_the_validator_rejects_a_broken_rayservice(mutate, expected):
    broken = copy.deepcopy(rayservice("prod"))
    mutate(broken)
    assert any(expected in error for error in validation_errors(broken)), validation_errors(broken)


def test_the_validator_rejects_broken_core_and_unknown_kinds():
    netpol = copy.deepcopy(next(o for o in rendered("prod") if o["kind"] == "NetworkPolicy"))
    netpol["spec"]["podSelectr"] = {}
    assert validation_errors(netpol)
    assert any("neither" in e for e in validation_errors(
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}))


def test_both_overlays_include_the_monitoring_directory():
    monitoring = {(o["kind"], o["metadata"]["name"]) for o in manifests.render(CLUSTER / "monitoring")}
    for overlay in OVERLAYS:
        present = {(o["kind"], o["metadata"]["name"]) for o in rendered(overlay)}
        assert monitoring <= present, f"{overlay} lacks {monitoring - present}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_and_ray_pod_carries_the_app_label(variant):
    objects = rendered(variant)
    unlabeled = [f"{o['kind']} {o['metadata']['name']}" for o in objects
                 if o["metadata"].get("labels", {}).get("app.kubernetes.io/name") != "serve-app"]
    unlabeled += [name for name, t in pod_templates(objects).items()
                  if t.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name") != "serve-app"]
    assert not unlabeled


# -- one source of truth ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_v2_is_configs_serve_config(variant):
    assert rayservice(variant)["spec"]["serveConfigV2"] == (ROOT / manifests.SERVE_CONFIG).read_text()


def test_generated_files_are_up_to_date():
    assert manifests.out_of_date(ROOT) == [], "run `make manifests`"
    result = subprocess.run([str(Path(sys.executable).parent / "serve-app"), "manifests", "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _copy_sources(tmp_path: Path) -> Path:
    for path in ("pyproject.toml", str(manifests.SERVE_CONFIG), str(manifests.GENERATED_DIR),
                 str(alert_rules.RULES), str(alert_rules.MANIFEST)):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        copy_ = shutil.copytree if (ROOT / path).is_dir() else shutil.copy
        copy_(ROOT / path, tmp_path / path)
    return tmp_path


def test_drift_is_caught_and_regeneration_fixes_it(tmp_path):
    """Edit the Serve config: --check fails naming the stale file; `manifests` makes it agree."""
    root = _copy_sources(tmp_path)
    cli = [str(Path(sys.executable).parent / "serve-app"), "manifests", "--root", str(root)]
    config = root / manifests.SERVE_CONFIG
    config.write_text(config.read_text().replace("target_ongoing_requests: 16", "target_ongoing_requests: 8", 1))
    check = subprocess.run([*cli, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "rayservice.yaml" in check.stderr
    assert subprocess.run(cli, capture_output=True).returncode == 0
    assert subprocess.run([*cli, "--check"], capture_output=True).returncode == 0
    patch = yaml.safe_load((root / manifests.GENERATED_DIR / "rayservice.yaml").read_text())
    assert patch["spec"]["serveConfigV2"] == config.read_text()


@pytest.mark.parametrize("user_config, reason", [
    ({"models": {"iris": {"version": "2"}}}, None),
    ({"models": {"tulip": {"version": "2"}}}, "'tulip' is not in args.models"),
    ({"models": {"iris": {"dedicated": True}}}, "cannot change without a restart"),
])
def test_the_ingress_user_config_is_checked_before_it_ships(tmp_path, user_config, reason):
    """A replica logs a user_config it cannot apply and serves on as before: generating the
    manifests refuses it instead, naming the reason."""
    root = _copy_sources(tmp_path)
    config = root / manifests.SERVE_CONFIG
    document = yaml.safe_load(config.read_text())
    app = document["applications"][0]
    next(d for d in app["deployments"] if d["name"] == "ModelServer")["user_config"] = user_config
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    run = subprocess.run([str(Path(sys.executable).parent / "serve-app"), "manifests", "--root", str(root)],
                         capture_output=True, text=True)
    if reason is None:
        assert run.returncode == 0, run.stderr
        patch = yaml.safe_load((root / manifests.GENERATED_DIR / "rayservice.yaml").read_text())
        assert patch["spec"]["serveConfigV2"] == config.read_text()
    else:
        assert run.returncode == 2 and reason in run.stderr and "application 'models'" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_a_version_bump_is_drift_too(tmp_path):
    root = _copy_sources(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "', 'version = "9', 1))
    assert manifests.GENERATED_DIR / "kustomization.yaml" in manifests.out_of_date(root)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_version_and_image_follow_the_pins(variant):
    import ray

    pins = manifests.read_pins(ROOT)
    assert pins.ray_version == ray.__version__, "the venv's Ray is not the pinned one"
    rs = rayservice(variant)
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == pins.ray_version
    images = {c["image"] for t in ray_pod_templates(rs).values() for c in t["spec"]["containers"]}
    assert images == {pins.image}
    # The autoscaler runs the head's image (KubeRay's default): no second image to keep in step.
    assert "image" not in rs["spec"]["rayClusterConfig"]["autoscalerOptions"]


def test_the_batch_score_rayjob_follows_the_pins_too():
    """cluster/jobs/batch-score takes both from generated/ as well (tests/test_rayjob.py checks the rest)."""
    require_tool("kubectl")
    pins = manifests.read_pins(ROOT)
    (job,) = [o for o in manifests.render(CLUSTER / "jobs" / "batch-score") if o["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == pins.ray_version
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    pods = [spec["submitterPodTemplate"], *(g["template"] for g in groups)]
    assert {c["image"] for pod in pods for c in pod["spec"]["containers"]} == {pins.image}


def test_serve_config_v2_validates_with_ray_serve_and_imports():
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load(rayservice("prod")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.parse_obj(document)
    assert schema.applications
    for app in schema.applications:
        module, _, attribute = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), app.import_path


# -- what docs/kubernetes.md promises ------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_cluster_shape(variant):
    spec = rayservice(variant)["spec"]
    cluster = spec["rayClusterConfig"]
    # Values KubeRay accepts but its CRD does not enumerate (it checks them when reconciling).
    assert spec["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "serve-app-ray-token"}
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and head.get("enableIngress") is False
    for name, template in ray_pod_templates(rayservice(variant)).items():
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        assert {k: env.get(k) for k in FAST_PATH_ENV} == FAST_PATH_ENV, name
        # KubeRay sets these from authOptions; a hand-set value would fight it.
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env), name


def test_make_serve_and_the_image_run_the_same_fast_path():
    """The Makefile and the Dockerfile set FAST_PATH_ENV's values, as the RayService's Pods do
    (test above) and the live tests' clusters (conftest)."""
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "Dockerfile").read_text()
    for key, value in FAST_PATH_ENV.items():
        assert re.search(rf"^export {key} \?= {re.escape(value)}$", makefile, re.M), key
        assert re.search(rf"^\s+{key}=\"?{re.escape(value)}\"? \\$", dockerfile, re.M), key


def test_dev_has_one_worker_group_with_min_one():
    groups = rayservice("dev")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(groups) == 1 and groups[0]["minReplicas"] == 1


def test_prod_survives_a_head_restart_and_keeps_replicas_off_the_head():
    objects = rendered("prod")
    spec = rayservice("prod")["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["excludeHeadPodFromServeSvc"] is True
    ft = cluster["gcsFaultToleranceOptions"]
    address = urllib.parse.urlparse(ft["redisAddress"])
    host, port = address.hostname, address.port
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "serve-app-redis", "key": "password"}
    # KubeRay refuses the older ways of configuring Redis next to gcsFaultToleranceOptions.
    head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & head_env
    redis_service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == host)
    assert any(p["port"] == port for p in redis_service["spec"]["ports"])
    assert not any(o["kind"] == "StatefulSet" for o in rendered("prod+redis-external"))
    workers = cluster["workerGroupSpecs"]
    dev_workers = rayservice("dev")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(g["maxReplicas"] for g in workers) > sum(g["maxReplicas"] for g in dev_workers)
    pdb = next(o for o in objects if o["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_locked_down_and_sized(variant):
    objects = rendered(variant)
    problems = []
    for name, template in pod_templates(objects).items():
        pod = template["spec"]
        pod_sc = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a ServiceAccount token")
        containers = list(pod["containers"])
        if name == "RayService head":
            containers.append({"name": "autoscaler", **rayservice(variant)["spec"]["rayClusterConfig"]["autoscalerOptions"]})
        for c in containers:
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{name} / {c['name']}"
            if sc.get("runAsNonRoot") is not True:
                problems.append(f"{where}: not runAsNonRoot")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allows privilege escalation")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: keeps capabilities")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                    problems.append(f"{where}: no cpu/memory {kind}")
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    problems += [f"ServiceAccount {a['metadata']['name']} mounts tokens by default"
                 for a in accounts if a.get("automountServiceAccountToken") is not False]
    assert not problems, "\n".join(problems)


def test_only_the_autoscaler_gets_the_kubernetes_api_token():
    cluster = rayservice("prod")["spec"]["rayClusterConfig"]
    volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
    mounts = [m for m in cluster["autoscalerOptions"]["volumeMounts"] if m["mountPath"] != "/tmp"]
    assert [m["mountPath"] for m in mounts] == ["/var/run/secrets/kubernetes.io/serviceaccount"]
    sources = volumes[mounts[0]["name"]]["projected"]["sources"]
    assert any("serviceAccountToken" in s for s in sources)
    for template in ray_pod_templates(rayservice("prod")).values():
        for container in template["spec"]["containers"]:
            assert not any(m["name"] == mounts[0]["name"] for m in container.get("volumeMounts", []))


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_ports_exist_and_the_dashboard_stays_internal(variant):
    objects = rendered(variant)
    rs = rayservice(variant)
    ports = {name: {p["name"]: p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
             for name, t in ray_pod_templates(rs).items()}
    assert {"metrics": 8080, "as-metrics": 44217, "dash-metrics": 44227, "serve": 8000, "serve-grpc": 9000,
            "dashboard": 8265, "gcs-server": 6379, "client": 10001}.items() <= ports["head"].items()
    for name, worker_ports in ports.items():
        assert {"metrics": 8080, "serve": 8000, "serve-grpc": 9000}.items() <= worker_ports.items(), name
    policies = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("serve-app-ray")]
    named = {p["port"] for policy in policies for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert named <= set(ports["head"]), named - set(ports["head"])
    open_to_all = [rule for policy in policies for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == ["serve", "serve-grpc"]
    # Ingresses route only to the serve Service's serve ports; never the head Service (dashboard).
    for ingress in (o for o in objects if o["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = path["backend"]["service"]
                assert service["name"] == "serve-app-serve-svc" and service["port"] in (
                    {"name": "serve"}, {"name": "serve-grpc"}), service


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_grpc_port_is_the_serve_configs_and_kuberay_puts_it_on_the_serve_service(variant):
    """KubeRay v1.7.0 (BuildServeService, isServingPort) adds every head container port named
    ``serve`` or ``serve-*`` to the serve Service; the Serve config's gRPC port is that port on
    every Ray container, and the app's servicer is the one the config registers."""
    config = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    grpc_options = config["grpc_options"]
    assert grpc_options["grpc_servicer_functions"] == [
        "serve_app.grpc.service.add_inference_service_to_server"]
    for name, template in ray_pod_templates(rayservice(variant)).items():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0].get("ports", [])}
        assert ports.get("serve-grpc") == grpc_options["port"], name
        serving = [n for n in ports if n == "serve" or n.startswith("serve-")]
        assert sorted(serving) == ["serve", "serve-grpc"], name


@pytest.mark.parametrize("variant", [v for v, spec in VARIANTS.items() if "components/ingress" in spec.get("add", ())])
def test_the_grpc_ingress_speaks_grpc_to_the_grpc_port_over_tls(variant):
    ingresses = {o["metadata"]["name"]: o for o in rendered(variant) if o["kind"] == "Ingress"}
    grpc = ingresses["serve-app-grpc"]
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert "backend-protocol" not in str(ingresses["serve-app"]["metadata"].get("annotations"))
    (rule,) = grpc["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "serve-app-serve-svc",
                                                              "port": {"name": "serve-grpc"}}
    # ingress-nginx speaks HTTP/2 to clients only over TLS: the host must be in a TLS entry.
    assert any(rule["host"] in entry["hosts"] for entry in grpc["spec"]["tls"])
    assert rule["host"] != ingresses["serve-app"]["spec"]["rules"][0]["host"]


def test_s3_component_points_every_ray_container_at_the_bucket():
    for variant, expected in (("prod", "/home/ray/app/model_store"),
                              ("prod+ingress+s3-models", "s3://my-bucket/serve-app/models")):
        for name, template in ray_pod_templates(rayservice(variant)).items():
            container = template["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["SERVE_APP_STORE"] == expected, (variant, name)
            assert {"secretRef": {"name": "serve-app-s3", "optional": True}} in container["envFrom"]
    # Read by kustomize only: the bucket address is not applied as a ConfigMap.
    assert not any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == "serve-app-model-store"
                   for o in rendered("prod+ingress+s3-models"))


# -- docs/kubernetes.md names what the manifests have -------------------------------------------
def _kubernetes_page() -> str:
    return (ROOT / "docs" / "kubernetes.md").read_text()


def test_kubernetes_page_paths_exist():
    paths = set(re.findall(r"(?<![\w/.])((?:cluster|\.\./\.\.)/[\w./-]*[\w-])", _kubernetes_page()))
    assert paths
    missing = [p for p in paths if not (CLUSTER / p.removeprefix("../../")).exists()
               and not (ROOT / p).exists()]
    assert not missing


def test_kubernetes_page_secrets_and_services_are_the_manifests_ones():
    section = _kubernetes_page()
    objects = [*rendered("prod"), *rendered("prod+ingress+s3-models")]
    text = yaml.safe_dump_all(objects)
    created = dict(re.findall(r"create secret generic ([\w-]+) \\\s*\n\s*--from-literal=(\w+)=", section))
    assert created == {"serve-app-ray-token": "auth_token", "serve-app-redis": "password",
                       "serve-app-s3": "AWS_ACCESS_KEY_ID"}
    cluster = rayservice("prod")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["secretName"] == "serve-app-ray-token"  # KubeRay reads key auth_token
    assert cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert "name: serve-app-s3" in text
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert namespaces == {"serve-app"} and "kubectl create namespace serve-app" in section
    # KubeRay names the Services after the RayService; port-forwards use their ports.
    name = rayservice("prod")["metadata"]["name"]
    head_ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    forwards = re.findall(r"port-forward svc/([\w-]+) (\d+):(\d+)", section)
    for service, _, port in forwards:
        if service.startswith(name):
            assert service in (f"{name}-serve-svc", f"{name}-head-svc") and int(port) in head_ports
    assert {s for s, _, _ in forwards} >= {f"{name}-serve-svc", f"{name}-head-svc"}
    assert f"kubectl apply --server-side -k cluster/overlays/dev" in section


# -- what the cluster's controllers would do with the objects (beyond any schema) ----------------
# KubeRay v1.7.0 labels the Pods it creates (ray-operator/controllers/ray/common/pod.go,
# labelPod): these keys are set on every Ray Pod; the template's own labels win, except for
# ray.io/node-type, ray.io/group and ray.io/cluster, which KubeRay always sets itself.
def kuberay_pod_labels(template: dict, cluster: str, node_type: str, group: str) -> dict[str, str]:
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update(template.get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group})
    return labels


@dataclass(frozen=True)
class Pod:
    """A Pod as a NetworkPolicy or a PodDisruptionBudget sees it."""

    namespace: str
    labels: dict
    ports: dict  # container port name -> number
    namespace_labels: dict | None = None

    @property
    def ns_labels(self) -> dict:
        return self.namespace_labels or {"kubernetes.io/metadata.name": self.namespace}


def ray_pods(variant: str, cluster: str = "serve-app-abc12") -> dict[str, Pod]:
    """The Pods KubeRay would create for the variant's RayService (one per group)."""
    rs = rayservice(variant)
    namespace = rs["metadata"]["namespace"]
    spec = rs["spec"]["rayClusterConfig"]
    groups = [("head", "head", "headgroup", spec["headGroupSpec"]["template"])]
    groups += [(f"worker {g['groupName']}", "worker", g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return {name: Pod(namespace, kuberay_pod_labels(template, cluster, node_type, group),
                      {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])})
            for name, node_type, group, template in groups}


def matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions); an empty one matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if not {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
                "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]():
            return False
    return True


def admitted(policies: list[dict], peer: Pod, target: Pod, port: int) -> bool:
    """Kubernetes' NetworkPolicy ingress semantics: a Pod no policy selects takes everything;
    otherwise a connection needs one rule of one selecting policy whose peers and ports admit it.
    A peer with only a podSelector means Pods of the policy's own namespace; namespaceSelector and
    podSelector in one peer must both match. Named ports resolve on the target Pod."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target.namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and matches(p["spec"]["podSelector"], target.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = peers is None or any(
                (matches(f["namespaceSelector"], peer.ns_labels) if "namespaceSelector" in f
                 else peer.namespace == policy["metadata"]["namespace"])
                and matches(f.get("podSelector"), peer.labels)
                for f in peers)
            ports = rule.get("ports")
            port_ok = ports is None or any(
                (target.ports.get(p["port"]) if isinstance(p["port"], str) else p["port"]) == port for p in ports)
            if peer_ok and port_ok:
                return True
    return False


def policies_of(variant: str) -> list[dict]:
    return [o for o in rendered(variant) if o["kind"] == "NetworkPolicy"]


def peer_namespaces() -> dict:
    return yaml.safe_load((CLUSTER / "base" / "peer-namespaces.yaml").read_text())["data"]


# The KubeRay operator's Pod labels, v1.7.0: the Helm chart (helm-chart/kuberay-operator,
# templates/deployment.yaml with values.yaml's nameOverride/componentOverride) and the kustomize
# install (ray-operator/config/manager/manager.yaml).
OPERATOR_INSTALLS = {
    "helm": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
             "app.kubernetes.io/component": "kuberay-operator"},
    "kustomize": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_operator_installs_reach_the_dashboard_and_nobody_else_does(variant):
    pods, policies = ray_pods(variant), policies_of(variant)
    head = pods["head"]
    operator_ns = peer_namespaces()["kuberay-operator"]
    for install, labels in OPERATOR_INSTALLS.items():
        operator = Pod(operator_ns, labels, {})
        assert admitted(policies, operator, head, head.ports["dashboard"]), f"{install} operator shut out"
        assert admitted(policies, operator, head, head.ports["serve"]), f"{install} operator cannot probe serve"
        assert not admitted(policies, operator, head, head.ports["gcs-server"])
        # the same labels in another namespace are somebody else's Pod
        assert not admitted(policies, Pod("tenant-a", labels, {}), head, head.ports["dashboard"])
    assert not admitted(policies, Pod(operator_ns, {"app": "other"}, {}), head, head.ports["dashboard"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prometheus_scrapes_every_metrics_port_and_only_those(variant):
    pods, policies = ray_pods(variant), policies_of(variant)
    prometheus = Pod(peer_namespaces()["prometheus"], {"app.kubernetes.io/name": "prometheus"}, {})
    elsewhere = Pod("default", {"app.kubernetes.io/name": "prometheus"}, {})
    scraped = {p["port"] for o in rendered(variant) if o["kind"] == "PodMonitor"
               for p in o["spec"]["podMetricsEndpoints"]}
    assert "haproxy-metrics" in scraped
    for name, pod in pods.items():
        for port_name in scraped & set(pod.ports):
            assert admitted(policies, prometheus, pod, pod.ports[port_name]), (name, port_name)
            assert not admitted(policies, elsewhere, pod, pod.ports[port_name]), (name, port_name)
        for internal in ("dashboard", "gcs-server", "client"):
            if internal in pod.ports:
                assert not admitted(policies, prometheus, pod, pod.ports[internal]), (name, internal)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_pods_reach_each_other_and_strangers_only_the_serve_ports(variant):
    pods, policies = ray_pods(variant), policies_of(variant)
    stranger = Pod("default", {"app": "client"}, {})
    public = {"serve", "serve-grpc"}
    for name, pod in pods.items():
        for other in pods.values():
            assert admitted(policies, other, pod, 6379) and admitted(policies, other, pod, 45678), name
        assert all(admitted(policies, stranger, pod, pod.ports[p]) for p in public), name
        assert not [p for p, n in pod.ports.items() if p not in public and admitted(policies, stranger, pod, n)], name
    # During an upgrade the second RayCluster's Pods reach the first's (same labels but ray.io/cluster).
    newer = ray_pods(variant, cluster="serve-app-def34")
    assert admitted(policies, newer["worker cpu"], pods["head"], 6379)


def test_redis_admits_only_the_apps_pods():
    policies = policies_of("prod")
    redis_template = next(o for o in rendered("prod") if o["kind"] == "StatefulSet")["spec"]["template"]
    redis = Pod("serve-app", redis_template["metadata"]["labels"], {"redis": 6379})
    assert admitted(policies, ray_pods("prod")["head"], redis, 6379)
    assert not admitted(policies, Pod("serve-app", {"app": "other"}, {}), redis, 6379)


def test_peer_namespaces_come_from_one_place(tmp_path):
    """Edit peer-namespaces.yaml: both NetworkPolicies and the head's Prometheus/Grafana
    addresses follow; no ConfigMap is applied."""
    shutil.copytree(CLUSTER, tmp_path / "cluster")
    path = tmp_path / "cluster" / "base" / "peer-namespaces.yaml"
    path.write_text(path.read_text().replace("kuberay-operator: kuberay-system", "kuberay-operator: ops")
                    .replace("prometheus: monitoring", "prometheus: observability"))
    objects = manifests.render(tmp_path / "cluster" / "overlays" / "prod")
    selectors = {o["metadata"]["name"]: o["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
                 for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("serve-app-ray-from")}
    assert selectors == {"serve-app-ray-from-operator": {"kubernetes.io/metadata.name": "ops"},
                         "serve-app-ray-from-monitoring": {"kubernetes.io/metadata.name": "observability"}}
    head = manifests.the_rayservice(objects)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    env = {e["name"]: e.get("value") for e in head["spec"]["containers"][0]["env"]}
    assert ".observability.svc" in env["RAY_PROMETHEUS_HOST"] and ".observability.svc" in env["RAY_GRAFANA_HOST"]
    assert not any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == "serve-app-peer-namespaces" for o in objects)


def test_node_drains_can_evict_workers():
    """PodDisruptionBudgets on Pods whose owner has no scale subresource (a RayCluster) must use
    an integer minAvailable: with maxUnavailable or a percentage the disruption controller cannot
    count the expected Pods and allows no eviction at all."""
    objects = rendered("prod")
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert pdbs
    pods = ray_pods("prod")
    workers = rayservice("prod")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for pdb in pdbs:
        spec = pdb["spec"]
        assert "maxUnavailable" not in spec and isinstance(spec.get("minAvailable"), int), spec
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
        covered = [name for name, pod in pods.items() if matches(spec["selector"], pod.labels)]
        assert covered and "head" not in covered, covered
        # At the minimum size a drain can still take one worker.
        at_minimum = sum(g["minReplicas"] for g in workers if f"worker {g['groupName']}" in covered)
        assert 1 <= spec["minAvailable"] < at_minimum, (spec["minAvailable"], at_minimum)


# -- sizing: Serve's demand against the Ray cluster's supply -------------------------------------
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Ei": 2**60}


def quantity(value) -> float:
    """A Kubernetes resource quantity ("2", "500m", "6Gi") as a number."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


def ray_start_flags(group: dict) -> dict[str, str]:
    """The ``ray start`` flags KubeRay derives for a head or worker group: its rayStartParams,
    plus num-cpus and memory from the Ray container's limits where the params do not set them."""
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    flags = {key: str(value) for key, value in group.get("rayStartParams", {}).items()}
    flags.setdefault("num-cpus", str(int(quantity(limits["cpu"]))))
    flags.setdefault("memory", str(int(quantity(limits["memory"]))))
    return flags


def serve_cpu_demand(config: dict) -> tuple[list[float], list[float]]:
    """The CPU of every replica Serve asks for at the deployments' minimum and maximum."""
    low, high = [], []
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            cpus = float(deployment.get("ray_actor_options", {}).get("num_cpus", 1))
            scaling = deployment.get("autoscaling_config")
            n_min = scaling["min_replicas"] if scaling else deployment.get("num_replicas", 1)
            n_max = scaling["max_replicas"] if scaling else deployment.get("num_replicas", 1)
            low += [cpus] * n_min
            high += [cpus] * n_max
    return low, high


def node_cpus(group: dict) -> float:
    """num-cpus as KubeRay starts the node (rayStartParams, else the container's CPU limit)."""
    return float(ray_start_flags(group)["num-cpus"])


def nodes_needed(replicas: list[float], head_cpus: float, worker_cpus: float) -> int | None:
    """Workers first-fit-decreasing packing needs beside the head for these replicas."""
    bins = [head_cpus]
    for cpus in sorted(replicas, reverse=True):
        for i, free in enumerate(bins):
            if cpus <= free + 1e-9:
                bins[i] -= cpus
                break
        else:
            if cpus > worker_cpus:
                return None
            bins.append(worker_cpus - cpus)
    return len(bins) - 1


@pytest.mark.parametrize("variant", ["dev", "prod"])
def test_serve_scaling_out_makes_the_ray_autoscaler_add_workers(variant):
    """At its maximum Serve asks for more CPUs than the minimum of workers offers, so the worker
    group's maxReplicas is reachable; its minimum fits without scaling; and in prod the ceiling is
    exactly what Serve's maximum needs (more workers could never be used)."""
    config = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    low, high = serve_cpu_demand(config)
    cluster = rayservice(variant)["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    head, worker = node_cpus(cluster["headGroupSpec"]), node_cpus(group)
    assert nodes_needed(low, head, worker) <= group["minReplicas"], "Serve's minimum does not fit the minimum cluster"
    needed = nodes_needed(high, head, worker)
    assert needed is not None and needed > group["minReplicas"], (
        f"Serve's maximum ({sum(high)} CPUs) fits on {group['minReplicas']} workers: worker autoscaling never triggers")
    if variant == "prod":
        assert group["maxReplicas"] == needed, f"Serve's maximum needs {needed} workers, maxReplicas is {group['maxReplicas']}"


def test_the_sizing_check_fails_on_a_dead_ceiling():
    config = yaml.safe_load(rayservice("prod")["spec"]["serveConfigV2"])
    for deployment in config["applications"][0]["deployments"]:
        deployment["autoscaling_config"]["max_replicas"] = deployment["autoscaling_config"]["min_replicas"]
    _, high = serve_cpu_demand(config)
    cluster = rayservice("prod")["spec"]["rayClusterConfig"]
    assert nodes_needed(high, 0, node_cpus(cluster["workerGroupSpecs"][0])) <= cluster["workerGroupSpecs"][0]["minReplicas"]


# -- the Ingress lets through what the app accepts ---------------------------------------------------
def _nginx_size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", text).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


@pytest.mark.parametrize("variant", [v for v, spec in VARIANTS.items() if "components/ingress" in spec.get("add", ())])
def test_ingress_body_size_and_timeouts_follow_the_serve_config(variant):
    config = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    max_bytes = config["applications"][0]["args"]["max_request_bytes"]
    grpc_bytes = int(config["applications"][0]["runtime_env"]["env_vars"]["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])
    assert grpc_bytes == max_bytes  # one bound for HTTP bodies and gRPC messages
    ingresses = {o["metadata"]["name"]: o for o in rendered(variant) if o["kind"] == "Ingress"}
    assert set(ingresses) == {"serve-app", "serve-app-grpc"}
    for name, options in (("serve-app", "http_options"), ("serve-app-grpc", "grpc_options")):
        timeout = config[options]["request_timeout_s"]
        annotations = ingresses[name]["metadata"]["annotations"]
        assert _nginx_size(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) >= max_bytes, name
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            value = int(annotations[f"nginx.ingress.kubernetes.io/{key}"])
            assert timeout < value <= timeout + 10, (name, key, value, timeout)


# -- Redis ------------------------------------------------------------------------------------------
def test_managed_redis_is_reached_over_tls_with_its_ca():
    objects = rendered("prod+redis-external")
    cluster = manifests.the_rayservice(list(objects))["spec"]["rayClusterConfig"]
    address = urllib.parse.urlparse(cluster["gcsFaultToleranceOptions"]["redisAddress"])
    assert address.scheme == "rediss" and address.hostname and address.port
    # The GCS dials the provider's host itself (its certificate names it), not an in-cluster alias.
    assert not any(o["kind"] in ("Service", "StatefulSet") and "redis" in o["metadata"]["name"] for o in objects)
    head = cluster["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    ca_dir, ca_file = os.path.split(env["RAY_REDIS_CA_CERT"])
    volume = next(v for v in head["volumes"] if v["name"] == mounts[ca_dir])
    assert volume["secret"]["secretName"] == "serve-app-redis-ca"
    assert ca_file in {item["path"] for item in volume["secret"]["items"]}
    # In-cluster Redis: plain redis:// to the Service of the StatefulSet.
    in_cluster = urllib.parse.urlparse(rayservice("prod")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"])
    assert in_cluster.scheme == "redis" and in_cluster.hostname == "serve-app-redis"


def test_redis_statefulset_is_governed_by_a_headless_service_and_runs_a_patched_image():
    objects = rendered("prod")
    (statefulset,) = [o for o in objects if o["kind"] == "StatefulSet"]
    governing = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == statefulset["spec"]["serviceName"])
    assert governing["spec"].get("clusterIP") == "None"
    assert matches({"matchLabels": governing["spec"]["selector"]}, statefulset["spec"]["template"]["metadata"]["labels"])
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    repository, _, tag = container["image"].partition(":")
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", tag).groups())
    # The 2025 security fixes (CVE-2025-49844 and others) are in 7.2.11 on the 7.2 line, 7.4.6,
    # 8.0.4 and 8.2.2; this check knows the 7.2 line, the project's (BSD-licensed) choice.
    assert repository == "redis" and version[:2] == (7, 2) and version >= (7, 2, 11), container["image"]


# -- Pods: pulls, disk, read-only roots, spreading -----------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_image_pull_policy_fits_a_reusable_tag(variant):
    """The release tag is rebuilt in place for base-image fixes: prod pulls Always; dev runs
    images loaded into the nodes (kind load) and pulls only when absent. One policy per variant."""
    rs = rayservice(variant)
    policies = {c.get("imagePullPolicy") for t in ray_pod_templates(rs).values() for c in t["spec"]["containers"]}
    policies.add(rs["spec"]["rayClusterConfig"]["autoscalerOptions"].get("imagePullPolicy"))
    assert policies == ({"IfNotPresent"} if variant.startswith("dev") else {"Always"}), policies


@pytest.mark.parametrize("variant", VARIANTS)
def test_containers_have_read_only_roots_and_bounded_disk(variant):
    from serve_app.tools.container import WRITABLE_PATHS

    problems = []
    for name, template in pod_templates(rendered(variant)).items():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        containers = list(pod["containers"])
        if name == "RayService head":
            containers.append({"name": "autoscaler", **rayservice(variant)["spec"]["rayClusterConfig"]["autoscalerOptions"]})
        for c in containers:
            where = f"{name} / {c['name']}"
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root file system")
            if not name.startswith("RayService"):
                continue
            resources = c["resources"]
            if not ("ephemeral-storage" in resources.get("requests", {}) and "ephemeral-storage" in resources.get("limits", {})):
                problems.append(f"{where}: no ephemeral-storage request and limit")
                continue
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            paths = ("/tmp",) if c["name"] == "autoscaler" else WRITABLE_PATHS
            for path in paths:
                volume = mounts.get(path)
                if volume is None or "emptyDir" not in volume:
                    problems.append(f"{where}: no emptyDir at {path}")
                elif quantity(volume["emptyDir"].get("sizeLimit", "1Ei")) > quantity(resources["limits"]["ephemeral-storage"]):
                    problems.append(f"{where}: {path} may outgrow the container's ephemeral-storage limit")
    assert not problems, "\n".join(problems)


def test_prod_workers_spread_per_ray_cluster():
    """During an upgrade two RayClusters run: spreading counts only the new cluster's workers."""
    for group in rayservice("prod")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        constraints = group["template"]["spec"]["topologySpreadConstraints"]
        assert constraints and all("ray.io/cluster" in c.get("matchLabelKeys", []) for c in constraints)
        pods = ray_pods("prod")
        assert all(matches(c["labelSelector"], pods[f"worker {group['groupName']}"].labels) for c in constraints)


@pytest.mark.parametrize("variant", VARIANTS)
def test_haproxy_exporter_port_is_rays(variant):
    """HAProxy serves its own Prometheus exporter on RAY_SERVE_HAPROXY_METRICS_PORT on every node."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT

    for name, pod in ray_pods(variant).items():
        assert pod.ports.get("haproxy-metrics") == RAY_SERVE_HAPROXY_METRICS_PORT, name
