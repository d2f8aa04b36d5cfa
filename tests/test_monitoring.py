"""A real Prometheus (Debian's ``prometheus``) started with the repo's config, discovering the
live test cluster through the file-SD file Ray writes, and asserted through the PromQL HTTP
API: Ray's built-in Serve metrics and our per-model metrics arrive with the right labels and
exact values, drift gauges cross the threshold on shifted data only, every Grafana panel's
PromQL evaluates, and every alert rule evaluates cleanly on the real series."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris

from conftest import FLEET, FLEET_MAX_MODELS_PER_REPLICA, TAIL_MODELS, free_port, require_tool
from serve_app.monitoring.drift import PSI_ALERT_THRESHOLD
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore
from serve_app.monitoring.telemetry import UNKNOWN_MODEL

pytestmark = [pytest.mark.serve, pytest.mark.monitoring]

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_CONFIG = ROOT / "configs" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((ROOT / "cluster" / "monitoring" / "dashboards").glob("*.json"))
ALERTS = ROOT / "configs" / "prometheus" / "alerts.yml"


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def _api(self, endpoint: str, expr: str, timeout: float, **params) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/{endpoint}", params={"query": expr, **params}, timeout=timeout).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def query(self, expr: str) -> list[dict]:
        return self._api("query", expr, timeout=10)

    def query_range(self, expr: str, seconds: float, step: float = 1) -> list[dict]:
        """As a Grafana panel asks: every step over the last ``seconds``."""
        end = time.time()
        return self._api("query_range", expr, timeout=30, start=end - seconds, end=end, step=step)

    def value(self, expr: str) -> float:
        """A scalar-like query's value; 0 when it has no series (a counter never incremented)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(self, expr: str, predicate, timeout: float = 120, what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expr}: condition not met within {timeout}s; last {result}")
            time.sleep(1)


@pytest.fixture(scope="module")
def prometheus(serve_cluster, tmp_path_factory) -> Prometheus:
    binary = require_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # The shipped config, pointed at this cluster's file-SD file, scraping every second.
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["file_sd_configs"] = [{"files": [str(serve_cluster.prometheus_sd_file)]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.5)
        yield Prometheus(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def metrics_port(serve_cluster) -> str:
    return serve_cluster.metrics_url.split(":")[2].split("/")[0]


def test_ray_targets_discovered_through_file_sd(prometheus, serve_cluster):
    port = metrics_port(serve_cluster)
    targets = prometheus.wait_for(
        'up{job="ray"}', lambda r: any(t["metric"]["instance"].endswith(f":{port}") and t["value"][1] == "1"
                                       for t in r), what="Ray's metrics export port scraped")
    instances = {t["metric"]["instance"] for t in targets}
    assert not any(i.endswith(":44217") for i in instances), "the local autoscaler port is dropped"


# The shipped application's deployments: the ingress, the dedicated model, the long tail.
DEPLOYMENTS = {"ModelServer", "model-diabetes", "multiplexed-models"}


def test_builtin_serve_metrics_present(prometheus, http):
    http.post("/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    # Every deployment HEALTHY (6); an autoscaling step in between shows as 4/5 for a while.
    prometheus.wait_for(
        'ray_serve_deployment_status{application="models"}',
        lambda r: {s["metric"]["deployment"] for s in r} >= DEPLOYMENTS
        and all(s["value"][1] == "6" for s in r), what="every deployment HEALTHY")
    prometheus.wait_for('ray_serve_app_requests_total{model="iris",code="200"}',
                        lambda r: r and float(r[0]["value"][1]) > 0)
    replicas = prometheus.query('ray_serve_autoscaling_target_replicas{application="models"}')
    assert {s["metric"]["deployment"] for s in replicas} == DEPLOYMENTS


def settled(prometheus: Prometheus, serve_cluster, name: str, quiet_s: float = 4, **labels: str) -> float:
    """The counter's value once Prometheus agrees with Ray's export port and neither has
    changed for ``quiet_s`` (longer than Ray's 1 s report interval plus a scrape): nothing
    sent earlier is still on its way."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    deadline = time.monotonic() + 90
    last, since = None, time.monotonic()
    while True:
        direct = serve_cluster.metric_total(name, **labels)
        seen = prometheus.value(f"sum({name}{{{selector}}})")
        if seen != direct or seen != last:
            last, since = (seen if seen == direct else None), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return seen
        assert time.monotonic() < deadline, f"{name}{labels}: prometheus {seen} vs ray {direct}"
        time.sleep(0.5)


def wait_increase(prometheus: Prometheus, name: str, before: float, expected: float, **labels: str) -> None:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    expr = f"sum({name}{{{selector}}})"
    prometheus.wait_for(expr, lambda r: (float(r[0]["value"][1]) if r else 0.0) - before == expected,
                        what=f"{expr} to grow by {expected} from {before}")


def test_per_model_metrics_count_exactly_what_was_sent(prometheus, serve_cluster, http):
    store = ModelStore(str(serve_cluster.store))
    iris = load_runtime(store, "iris", "latest")
    version = iris.meta.version
    X = load_iris().data
    counters = {
        "ok": ("ray_serve_app_requests_total",
               dict(model="iris", version=version, protocol="v1", code="200", outcome="ok")),
        "bad": ("ray_serve_app_requests_total",
                dict(model="iris", version=version, protocol="v1", code="400", outcome="client_error")),
        "reason": ("ray_serve_app_input_errors_total", dict(model="iris", protocol="v1", reason="malformed_json")),
        "unknown": ("ray_serve_app_requests_total", dict(model=UNKNOWN_MODEL, protocol="v1", code="404")),
        "latency": ("ray_serve_app_request_latency_ms_count", dict(model="iris", protocol="v1")),
        "diabetes_values": ("ray_serve_app_prediction_value_count", dict(model="diabetes")),
    }
    classes = [str(c) for c in iris.meta.classes]
    for c in classes:
        counters[f"class {c}"] = ("ray_serve_app_predictions_total", {"model": "iris", "class": c})
    # The first counter waits out a quiet period; after it, nothing is in flight for the rest.
    before = {key: settled(prometheus, serve_cluster, name, quiet_s=4 if i == 0 else 0, **labels)
              for i, (key, (name, labels)) in enumerate(counters.items())}

    for _ in range(5):
        assert http.post("/v1/models/iris:predict", json={"instances": X.tolist()}).status_code == 200
    for _ in range(4):
        response = http.post("/v1/models/iris:predict", content=b'{"instances": [[1,',
                             headers={"content-type": "application/json"})
        assert response.status_code == 400
    for _ in range(2):
        assert http.post("/v1/models/tulip:predict", json={"instances": [[1, 2, 3, 4]]}).status_code == 404
    diabetes_rows = load_diabetes().data[:10].tolist()
    for _ in range(3):
        body = {"inputs": [{"name": "x", "shape": [10, 10], "datatype": "FP64", "data": diabetes_rows}]}
        assert http.post("/v2/models/diabetes/infer", json=body).status_code == 200

    predicted = collections.Counter(str(c) for c in iris.predict(X))
    expected = {"ok": 5, "bad": 4, "reason": 4, "unknown": 2, "latency": 9, "diabetes_values": 30,
                **{f"class {c}": 5 * predicted.get(c, 0) for c in classes}}
    for key, (name, labels) in counters.items():
        wait_increase(prometheus, name, before[key], expected[key], **labels)
    assert prometheus.query('ray_serve_app_requests_total{model="tulip"}') == [], \
        "unknown model names must not become label values"

    # Labels Ray adds, and the loaded-model gauges.
    info = prometheus.query(f'ray_serve_app_model_info{{model="iris",sha256="{iris.meta.sha256}"}}')
    assert info and all(s["value"][1] == "1" for s in info)
    assert {"application", "deployment", "replica", "framework", "version"} <= set(info[0]["metric"])
    assert info[0]["metric"]["framework"] == iris.meta.framework
    assert prometheus.value('min(ray_serve_app_model_load_seconds{model="iris"})') > 0
    # Millisecond resolution: the lowest latency bucket boundary is below 1 ms.
    buckets = {s["metric"]["le"] for s in prometheus.query(
        'ray_serve_app_request_latency_ms_bucket{model="iris",protocol="v1"}')}
    assert min(float(b) for b in buckets) < 1


def drift_scores(prometheus: Prometheus) -> dict[tuple[str, str], float]:
    return {(s["metric"]["replica"], s["metric"]["feature"]): float(s["value"][1])
            for s in prometheus.query('ray_serve_app_feature_drift_psi{model="breast-cancer"}')}


def feed_until(prometheus: Prometheus, http, rows: np.ndarray, done, what: str, timeout: float = 120) -> dict:
    """Send ``rows`` (one request) again and again until the replicas' drift gauges satisfy
    ``done``: every replica's window then holds only these rows, recomputed at least once."""
    body = {"instances": rows.tolist()}
    deadline = time.monotonic() + timeout
    while True:
        assert http.post("/v1/models/breast-cancer:predict", json=body).status_code == 200
        windows = prometheus.query('ray_serve_app_drift_window_rows{model="breast-cancer"}')
        scores = drift_scores(prometheus)
        if windows and all(s["value"][1] == str(len(rows)) for s in windows) and scores and done(scores):
            return scores
        assert time.monotonic() < deadline, f"{what}: last scores {scores}"
        time.sleep(0.3)


def test_drift_gauge_crosses_threshold_only_for_shifted_inputs(prometheus, serve_cluster, http):
    (spec,) = [m for m in serve_cluster.config["applications"][0]["args"]["models"] if m["name"] == "breast-cancer"]
    window = spec["drift"]["window_rows"]
    data = load_breast_cancer().data
    rng = np.random.default_rng(7)
    in_distribution = data[rng.choice(len(data), size=window, replace=False)]
    names = load_runtime(ModelStore(str(serve_cluster.store)), "breast-cancer", "latest").meta.feature_names
    shifted_feature = names.index("mean_radius")

    calm = feed_until(prometheus, http, in_distribution,
                      lambda s: len({f for _, f in s}) == len(names), "in-distribution PSI reported")
    calm = feed_until(prometheus, http, in_distribution,
                      lambda s: max(s.values()) < PSI_ALERT_THRESHOLD, "in-distribution PSI below threshold")
    assert max(calm.values()) < PSI_ALERT_THRESHOLD

    shifted = in_distribution.copy()
    shifted[:, shifted_feature] += 2 * data[:, shifted_feature].std()
    drifted = feed_until(
        prometheus, http, shifted,
        lambda s: all(v > PSI_ALERT_THRESHOLD for (_, f), v in s.items() if f == "mean_radius"),
        "shifted feature's PSI above threshold")
    others = [v for (_, f), v in drifted.items() if f != "mean_radius"]
    assert max(others) < PSI_ALERT_THRESHOLD, "only the shifted feature drifts"


def walk_panels(panels: list[dict]) -> list[dict]:
    found = []
    for panel in panels:
        found += walk_panels(panel.get("panels", [])) if panel["type"] == "row" else [panel]
    return found


def panel_queries(dashboard: dict) -> list[tuple[str, list[str]]]:
    return [(p["title"], [t["expr"] for t in p["targets"]]) for p in walk_panels(dashboard["panels"])]


def as_promql(expr: str) -> str:
    """Grafana's template variables as a plain Prometheus query would have them."""
    return expr.replace("$__rate_interval", "1m").replace('=~"$model"', '=~".*"')


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_every_dashboard_panel_evaluates_with_data(prometheus, http, path):
    dashboard = json.loads(path.read_text())
    http.post("/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    empty = []
    for title, exprs in panel_queries(dashboard):
        assert exprs, f"panel {title!r} has no query"
        results = []
        for expr in exprs:
            assert "$" not in as_promql(expr), f"unhandled template variable in {expr}"
            results.extend(prometheus.query(as_promql(expr)))  # asserts status success
        if not results:
            empty.append(title)
    # The earlier tests drove every kind of traffic, so every panel has something to draw.
    assert empty == [], f"panels without data: {empty}"


def test_alert_rules_evaluate_on_real_series(prometheus):
    time.sleep(3)  # at least two evaluation rounds after the drift test
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    expected = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert set(rules) == expected
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    # The drift alert matches the real gauge's labels: pending for breast-cancer's shifted
    # feature only. (Other models may drift too: earlier tests send iris the same row over and
    # over, which is drift indeed.)
    drift = [a for a in rules["ServeAppFeatureDrift"]["alerts"] if a["labels"]["model"] == "breast-cancer"]
    assert {a["labels"]["feature"] for a in drift} == {"mean_radius"}
    assert rules["ServeDeploymentUnhealthy"]["alerts"] == []
    assert rules["ServeMetricsAbsent"]["alerts"] == []


# -- Ray's own dashboards (cluster/monitoring/ray-dashboards/, embedded by the Ray dashboard) ----
RAY_DASHBOARDS = sorted((ROOT / "cluster" / "monitoring" / "ray-dashboards").glob("*.json"))

# What the Ray dashboard's frontend puts in each iframe URL (var-...), besides var-datasource:
# the Metrics view passes the session name to the default and data dashboards; the Serve replica
# charts and "View in Grafana" pass a deployment (and a replica, left at All as the deployment's
# button does): one view per deployment. Every other variable stays at its default, All.
# var-Cluster only comes with RAY_GRAFANA_CLUSTER_FILTER, unset here and on the head.
VIEWS_OF_THE_RAY_DASHBOARD = {
    "default_grafana_dashboard.json": lambda session: [{"SessionName": session}],
    "data_grafana_dashboard.json": lambda session: [{"SessionName": session}],
    "serve_grafana_dashboard.json": lambda session: [{}],
    "serve_deployment_grafana_dashboard.json": lambda session: [{"Deployment": d} for d in sorted(DEPLOYMENTS)],
}

# Panels whose series cannot exist on this cluster: a local `ray start` (one node, CPU only, no
# autoscaler) serving the test applications and running one small Ray Data job, nothing failing.
# Each still has to evaluate without error.
_NO_GPU = "no GPU on this machine: Ray exports no ray_node_gpus_*/ray_node_gram_*/GPU resource series"
_NO_TPU = "no TPU on this machine"
_NO_AUTOSCALER = "a local `ray start` runs no cluster autoscaler, the exporter of autoscaler_* (KubeRay's head does)"
_NO_EXCEPTIONS = ("Serve counts exceptions raised in a replica; the app answers every failure with an HTTP "
                  "status and a reason, so nothing raises")
_NO_FAILURES = "no worker is OOM-killed or dies unexpectedly during the suite"
RAY_PANELS_WITHOUT_DATA_HERE: dict[str, dict[str, str]] = {
    "default_grafana_dashboard.json": {
        "Node Count": _NO_AUTOSCALER,
        "Ray OOM Kills (Tasks and Actors)": _NO_FAILURES,
        "Unexpected System Level Worker Failures": _NO_FAILURES,
        "Node GPU Usage": _NO_GPU,
        "Node GPU Usage %": _NO_GPU,
        "Node GPU Memory Usage (GRAM)": _NO_GPU,
        "Node GPU Memory Usage (GRAM) %": _NO_GPU,
        "Node GPU Power": _NO_GPU,
        "Node GPU Temperature": _NO_GPU,
        "Node GPU Usage by Component": _NO_GPU,
        "Node GPU Memory Usage by Component": _NO_GPU,
        "Logical GPUs Usage": _NO_GPU,
        "All Placement Groups by State": "no placement group exists: the Serve config asks for no "
                                         "placement_group_bundles, and Ray Data uses none",
        "Node TPU Tensorcore Utilization %": _NO_TPU,
        "Node TPU High Bandwidth Memory Utilization %": _NO_TPU,
    },
    "serve_grafana_dashboard.json": {
        "Error QPS per deployment": _NO_EXCEPTIONS,
        "Node count": _NO_AUTOSCALER,
        "Ongoing gRPC Requests": "the applications serve no gRPC (no gRPC proxy runs)",
    },
    "serve_deployment_grafana_dashboard.json": {
        "Error QPS per replica": _NO_EXCEPTIONS,
    },
    "data_grafana_dashboard.json": {
        "Task Completion Time Without Backpressure": (
            "Ray 2.60's panel reads ray_data_task_completion_time_excl_backpressure_s, a name Ray Data "
            "never exports (its metric is average_task_completion_time_excl_backpressure_s)"),
    },
}


def _regex_escape(value: str) -> str:
    """Grafana's escaping of a variable's value inside a Prometheus regex matcher."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def ray_variables(dashboard: dict, passed: dict[str, str]) -> dict[str, str]:
    """Each template variable's value in the Ray dashboard's iframe: what its URL passes, and
    All for the rest (the variable's allValue, or every option of a custom variable)."""
    values = {}
    for variable in dashboard["templating"]["list"]:
        name = variable["name"]
        if name == "datasource":
            continue
        if name in passed:
            values[name] = _regex_escape(passed[name])
        else:
            assert variable.get("includeAll"), f"{name} has no All and the Ray dashboard passes no value"
            options = [o["value"] for o in variable.get("options", []) if o["value"] != "$__all"]
            values[name] = variable.get("allValue") or "(" + "|".join(map(_regex_escape, options)) + ")"
    # Grafana's built-ins for the Metrics view's range (now-5m) and a 1 s scrape.
    values.update({"__rate_interval": "1m", "__range": "5m"})
    return values


def as_ray_promql(expr: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), expr)


def run_a_ray_data_job() -> None:
    """A small Ray Data pipeline on the live cluster (the fixture's driver): reads, a map, and a
    slow consumer, so the data dashboard's operator, throughput and iterator series exist for
    several scrapes (Ray Data drops its gauges when a dataset finishes)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_per_node_metrics = True  # the "(by Node)" panels; off by default
    ds = ray.data.range(20_000, override_num_blocks=20).map_batches(
        lambda batch: {"id": batch["id"] * 2}, num_cpus=0.1)
    rows = 0
    for batch in ds.iter_batches(batch_size=250):
        rows += len(batch["id"])
        time.sleep(0.1)  # ~8 s of iteration
    assert rows == 20_000


@pytest.fixture(scope="module")
def ray_data_ran(prometheus, serve_cluster) -> None:
    run_a_ray_data_job()
    prometheus.wait_for('max_over_time(ray_data_output_bytes[5m])', bool, timeout=60, what="Ray Data's series scraped")


def test_ray_writes_the_dashboards_we_ship_for_its_session(serve_cluster):
    """The live head's own files (metrics/grafana/dashboards/) are the shipped ones."""
    from serve_app.tools.ray_dashboards import normalise

    written = serve_cluster.session_dir / "metrics" / "grafana" / "dashboards"
    assert RAY_DASHBOARDS
    for path in RAY_DASHBOARDS:
        assert normalise((written / path.name).read_text()) == path.read_text(), path.name


@pytest.mark.parametrize("path", RAY_DASHBOARDS, ids=[p.name for p in RAY_DASHBOARDS])
def test_every_ray_dashboard_panel_evaluates_with_data(prometheus, serve_cluster, http, ray_data_ran, path):
    """Each panel's PromQL as Grafana sends it from the Ray dashboard's iframes: variables filled
    as the frontend fills them, a range query over the view's last 5 minutes (instant where the
    target says so). Every query succeeds; every panel draws something on some view, unless it
    is listed with its reason in RAY_PANELS_WITHOUT_DATA_HERE."""
    dashboard = json.loads(path.read_text())
    session = serve_cluster.session_dir.resolve().name
    exempt = RAY_PANELS_WITHOUT_DATA_HERE[path.name]
    panels = walk_panels(dashboard["panels"])
    titles = [p["title"] for p in panels]
    assert set(exempt) <= set(titles), f"exempt panels no longer in the dashboard: {set(exempt) - set(titles)}"
    # Traffic through every deployment: in-process iris, the dedicated diabetes deployment and
    # multiplexed long-tail models (both through DeploymentHandles, so their routers report), one
    # more of those than a replica holds, so one is evicted (the unload panels).
    assert http.post("/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
    assert http.post("/v1/models/diabetes:predict", json={"instances": [[0.0] * 10]}).status_code == 200
    for name in TAIL_MODELS[:FLEET_MAX_MODELS_PER_REPLICA + 1]:
        assert http.post(f"{FLEET}/v1/models/{name}:predict",
                         json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
    time.sleep(4)  # the requests' series reported (1 s) and scraped (1 s)
    with_data: set[str] = set()
    last: dict[str, list[str]] = {}
    for passed in VIEWS_OF_THE_RAY_DASHBOARD[path.name](session):
        variables = ray_variables(dashboard, passed)
        for panel in panels:
            exprs = [as_ray_promql(t["expr"], variables) for t in panel["targets"]]
            assert exprs, f"panel {panel['title']!r} has no query"
            for target, expr in zip(panel["targets"], exprs):
                assert "$" not in expr, f"unhandled template variable in {expr}"
                result = (prometheus.query(expr) if target.get("instant")
                          else prometheus.query_range(expr, seconds=300))  # both assert success
                if result:
                    with_data.add(panel["title"])
            last[panel["title"]] = exprs
    unexplained = {t: e for t, e in last.items() if t not in with_data and t not in exempt}
    assert not unexplained, "panels without data:\n" + "\n".join(f"{t}: {e}" for t, e in unexplained.items())
