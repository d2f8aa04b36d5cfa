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
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD in the folder."""
    validators = {}
    for path in sorted(_crd_dir().glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served"):
                    schema = _strict(version["schema"]["openAPIV3Schema"])
                    validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return validators


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
    host, _, port = ft["redisAddress"].partition(":")
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "serve-app-redis", "key": "password"}
    # KubeRay refuses the older ways of configuring Redis next to gcsFaultToleranceOptions.
    head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"} & head_env
    redis_service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == host)
    assert any(p["port"] == int(port) for p in redis_service["spec"]["ports"])
    external = next(o for o in rendered("prod+redis-external") if o["metadata"]["name"] == host)
    assert external["spec"]["type"] == "ExternalName"
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
    mounts = cluster["autoscalerOptions"]["volumeMounts"]
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
    assert {"metrics": 8080, "as-metrics": 44217, "dash-metrics": 44227, "serve": 8000,
            "dashboard": 8265, "gcs-server": 6379, "client": 10001}.items() <= ports["head"].items()
    for name, worker_ports in ports.items():
        assert {"metrics": 8080, "serve": 8000}.items() <= worker_ports.items(), name
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "serve-app-ray")
    named = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert named <= set(ports["head"]), named - set(ports["head"])
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == ["serve"]
    # Ingresses route only to the serve Service's serve port; never the head Service (dashboard).
    for ingress in (o for o in objects if o["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = path["backend"]["service"]
                assert service["name"] == "serve-app-serve-svc" and service["port"] in ({"name": "serve"}, {"number": 8000})


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
