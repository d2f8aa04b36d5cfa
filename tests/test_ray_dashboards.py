"""Ray's own Grafana dashboards as shipped in cluster/monitoring/ray-dashboards/ (no Ray started).

The Ray dashboard embeds Grafana dashboards by uid; these tests read the installed Ray to check
that we ship what it embeds: the set of dashboards its frontend uses, the uids and files its
dashboard head produces, the panels it embeds one by one, every file current (`--check`), each in
a ConfigMap Grafana's sidecar loads in both overlays, and the kube-prometheus-stack values that
make the iframes work. Their PromQL against a real Prometheus: tests/test_monitoring.py.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from urllib.parse import urlparse

import pytest
import ray
import yaml

from conftest import require_tool
from serve_app.tools import alert_rules, manifests, ray_dashboards

ROOT = manifests.ROOT
CLUSTER = ROOT / "cluster"
OVERLAYS = sorted(p.parent.name for p in (CLUSTER / "overlays").glob("*/kustomization.yaml"))
VALUES = CLUSTER / "monitoring" / "kube-prometheus-stack-values.yaml"
SHIPPED = ray_dashboards.shipped()
RAY_DASHBOARD_DIR = Path(ray.__file__).parent / "dashboard"
CONFIGMAP_LIMIT = 1024 * 1024  # bytes of data a ConfigMap may hold
ANNOTATION_LIMIT = 256 * 1024  # kubectl apply (client-side) stores the object in one annotation


def walk_panels(panels: list[dict]) -> list[dict]:
    """Every panel that draws something, including those inside (collapsed) rows."""
    found = []
    for panel in panels:
        if panel["type"] == "row":
            found += walk_panels(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def load(dashboard: ray_dashboards.RayDashboard) -> dict:
    return json.loads((ROOT / dashboard.path).read_text())


# -- what the Ray dashboard asks for --------------------------------------------------------------
def frontend_sources() -> dict[str, str]:
    """The Ray dashboard frontend's own TypeScript sources, from the source map Ray ships."""
    maps = glob.glob(str(RAY_DASHBOARD_DIR / "client" / "build" / "static" / "js" / "main.*.js.map"))
    assert len(maps) == 1, f"expected one frontend source map in the installed Ray, found {maps}"
    source_map = json.loads(Path(maps[0]).read_text())
    return {name: text for name, text in zip(source_map["sources"], source_map["sourcesContent"])
            if text and "node_modules" not in name}


def embedded_keys(text: str) -> set[str]:
    return set(re.findall(r"dashboardUids\?\.(\w+)", text))


def test_we_ship_exactly_the_dashboards_the_frontend_embeds():
    embedded = set().union(*(embedded_keys(text) for text in frontend_sources().values()))
    assert embedded == {d.frontend_key for d in SHIPPED}, "the Ray dashboard embeds another set of dashboards"


def test_the_head_writes_the_same_dashboards_with_the_uids_it_reports(tmp_path):
    """MetricsHead writes its session's metrics/grafana/dashboards/ and keeps the uids that
    /api/grafana_health returns (dashboard_uids); run that code on a stand-in for the head."""
    from ray.dashboard.modules.metrics.metrics_head import DEFAULT_PROMETHEUS_NAME, MetricsHead

    output = tmp_path / "dashboards"
    head = types.SimpleNamespace(
        _grafana_config_output_path=str(tmp_path / "grafana"),
        _grafana_session_latest_config_output_path=str(tmp_path / "grafana"),
        _grafana_dashboard_output_dir=str(output), _prometheus_name=DEFAULT_PROMETHEUS_NAME,
        _dashboard_uids={})
    MetricsHead._create_default_grafana_configs(head)
    for dashboard in SHIPPED:
        assert head._dashboard_uids[dashboard.key] == dashboard.uid
        written = (output / dashboard.filename).read_text()
        assert ray_dashboards.normalise(written) == (ROOT / dashboard.path).read_text(), dashboard.filename


@pytest.mark.parametrize("dashboard", SHIPPED, ids=[d.key for d in SHIPPED])
def test_every_dashboard_parses_and_carries_ray_s_uid(dashboard):
    shipped = load(dashboard)
    assert shipped["uid"] == dashboard.config.default_uid  # the constant in Ray's *_panels.py
    assert f"rayVersion:{ray.__version__}" in shipped["tags"]
    panels = walk_panels(shipped["panels"])
    assert panels and all(t["expr"] for p in panels for t in p["targets"])
    # Every panel reads the `datasource` variable, a Prometheus-typed data-source picker, which
    # the Ray dashboard sets in its iframe URLs (var-datasource).
    assert {p.get("datasource") for p in panels} == {"${datasource}"}
    (variable,) = [v for v in shipped["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")


def test_the_panels_the_frontend_embeds_one_by_one_exist():
    by_key = {d.frontend_key: {p["id"] for p in walk_panels(load(d)["panels"])} for d in SHIPPED}
    checked = 0
    for name, text in frontend_sources().items():
        keys, panel_ids = embedded_keys(text), {int(i) for i in re.findall(r"panelId=(\d+)", text)}
        if not panel_ids:
            continue
        assert len(keys) == 1, f"{name}: cannot tell which dashboard panels {panel_ids} belong to"
        (key,) = keys
        missing = panel_ids - by_key[key]
        assert not missing, f"{name} embeds panels {missing} that the {key} dashboard lacks"
        checked += len(panel_ids)
    assert checked >= 10  # overview cards, Serve page and replica charts


# -- generated, current, caught when edited -------------------------------------------------------
def test_the_generated_files_include_every_dashboard_and_are_current():
    generated = manifests.generated_files(ROOT)
    assert {d.path for d in SHIPPED} <= set(generated)
    stale = set(manifests.out_of_date(ROOT))
    assert not stale & {d.path for d in SHIPPED}, "run `make manifests`"


def test_check_catches_an_edited_dashboard_and_regeneration_restores_it(tmp_path):
    for path in ("pyproject.toml", str(manifests.SERVE_CONFIG), str(alert_rules.RULES)):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    cli = [str(Path(sys.executable).parent / "serve-app"), "manifests", "--root", str(tmp_path)]
    assert subprocess.run(cli, capture_output=True).returncode == 0
    assert subprocess.run([*cli, "--check"], capture_output=True).returncode == 0
    target = tmp_path / SHIPPED[0].path
    original = target.read_text()
    assert original == (ROOT / SHIPPED[0].path).read_text()
    edited = json.loads(original)
    edited["panels"][1]["targets"][0]["expr"] = "vector(1)"
    target.write_text(json.dumps(edited))
    check = subprocess.run([*cli, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and str(SHIPPED[0].path) in check.stderr
    target.unlink()
    check = subprocess.run([*cli, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and str(SHIPPED[0].path) in check.stderr
    assert subprocess.run(cli, capture_output=True).returncode == 0
    assert target.read_text() == original


def test_a_ray_other_than_the_pin_is_refused():
    with pytest.raises(RuntimeError, match="pins 9.9.9"):
        ray_dashboards.generated_files("9.9.9")


def test_ray_s_environment_overrides_do_not_leak_into_the_files(monkeypatch):
    monkeypatch.setenv("RAY_GRAFANA_DEFAULT_DASHBOARD_UID", "elsewhere")
    monkeypatch.setenv("RAY_GRAFANA_DEFAULT_DASHBOARD_GLOBAL_FILTERS", 'k8s_cluster="x"')
    assert ray_dashboards.render(SHIPPED[0]) == (ROOT / SHIPPED[0].path).read_text()
    assert os.environ["RAY_GRAFANA_DEFAULT_DASHBOARD_UID"] == "elsewhere"  # restored afterwards


# -- in the manifests, where Grafana's sidecar finds them -----------------------------------------
def rendered(overlay: str) -> list[dict]:
    require_tool("kubectl")
    return manifests.render(CLUSTER / "overlays" / overlay)


def dashboard_configmaps(objects: list[dict], label: str, value: str) -> list[dict]:
    return [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get(label) == value]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_dashboard_is_a_labelled_configmap_under_the_size_limits(overlay):
    values = yaml.safe_load(VALUES.read_text())["grafana"]["sidecar"]["dashboards"]
    objects = rendered(overlay)
    configmaps = dashboard_configmaps(objects, values["label"], values["labelValue"])
    by_name = {c["metadata"]["name"]: c for c in configmaps}
    for dashboard in SHIPPED:
        configmap = by_name.get(dashboard.configmap_name)
        assert configmap, f"{overlay}: no ConfigMap {dashboard.configmap_name} labelled {values['label']}"
        assert configmap["data"] == {dashboard.filename: (ROOT / dashboard.path).read_text()}
        labels = configmap["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "serve-app"
        assert labels["app.kubernetes.io/component"] == "monitoring"
        assert sum(len(v.encode()) for v in configmap["data"].values()) < CONFIGMAP_LIMIT
        assert len(json.dumps(configmap, separators=(",", ":"))) < ANNOTATION_LIMIT
    # The sidecar writes every key into one folder, and Grafana refuses a second dashboard with
    # a uid it already has: file names and uids unique across ours and Ray's.
    keys = [k for c in configmaps for k in c["data"]]
    assert len(keys) == len(set(keys))
    uids = [json.loads(v)["uid"] for c in configmaps for v in c["data"].values()]
    assert len(uids) == len(set(uids)) and {d.uid for d in SHIPPED} <= set(uids)


# -- the kube-prometheus-stack values and the head's environment --------------------------------
def head_env(overlay: str) -> dict[str, str]:
    rs = manifests.the_rayservice(rendered(overlay))
    containers = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    (head,) = [c for c in containers if c["name"] == "ray-head"]
    return {e["name"]: e.get("value") for e in head.get("env", [])}


def test_the_values_file_lets_the_dashboard_embed_grafana():
    values = yaml.safe_load(VALUES.read_text())
    ini = values["grafana"]["grafana.ini"]
    assert ini["security"]["allow_embedding"] is True
    assert ini["auth.anonymous"] == {"enabled": True, "org_name": "Main Org.", "org_role": "Viewer"}
    dashboards = values["grafana"]["sidecar"]["dashboards"]
    assert dashboards["enabled"] is True and dashboards["searchNamespace"] == "ALL"
    spec = values["prometheus"]["prometheusSpec"]
    assert spec["podMonitorSelectorNilUsesHelmValues"] is False
    assert spec["ruleSelectorNilUsesHelmValues"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_head_s_environment_matches_the_values(overlay):
    from ray.dashboard.modules.metrics.metrics_head import (
        DEFAULT_PROMETHEUS_NAME,
        GRAFANA_HOST_ENV_VAR,
        PROMETHEUS_HOST_ENV_VAR,
        PROMETHEUS_NAME_ENV_VAR,
    )

    values = yaml.safe_load(VALUES.read_text())
    env = head_env(overlay)
    # The uids the head reports are Ray's defaults, the ones shipped.
    overrides = [k for k in env if re.fullmatch(r"RAY_GRAFANA_\w+_DASHBOARD_(UID|GLOBAL_FILTERS)", k)]
    assert not overrides
    # The head names the data source in every iframe URL; the chart's default one is it.
    datasource = values["grafana"]["sidecar"]["datasources"]
    assert datasource["defaultDatasourceEnabled"] is True
    assert datasource["name"] == env.get(PROMETHEUS_NAME_ENV_VAR, DEFAULT_PROMETHEUS_NAME)
    # The head reaches the chart's Services: Grafana's (fullnameOverride, port 80) and the
    # operator's prometheus-operated (9090), both in namespace monitoring.
    grafana = urlparse(env[GRAFANA_HOST_ENV_VAR])
    assert (grafana.hostname, grafana.port) == (f"{values['grafana']['fullnameOverride']}.monitoring.svc", None)
    prometheus = urlparse(env[PROMETHEUS_HOST_ENV_VAR])
    assert (prometheus.hostname, prometheus.port) == ("prometheus-operated.monitoring.svc", 9090)
    # Without a release label on them, only the NilUsesHelmValues=false selectors pick these up.
    monitors = [o for o in rendered(overlay) if o["kind"] in ("PodMonitor", "PrometheusRule")]
    assert monitors and not any("release" in o["metadata"].get("labels", {}) for o in monitors)
