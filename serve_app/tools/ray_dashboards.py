"""Ray's own Grafana dashboards, generated from the installed Ray, for Grafana's dashboard sidecar.

The Ray dashboard's *Metrics* view, its overview cards and its Serve pages embed Grafana
dashboards by uid (``<grafana>/d/<uid>`` and ``/d-solo/<uid>?panelId=N``). The uids come from the
dashboard head's ``/api/grafana_health`` (``dashboard_uids``, filled by
``ray/dashboard/modules/metrics/metrics_head.py`` when it writes the dashboards into its session's
``metrics/grafana/dashboards/``); on Kubernetes nothing loads those files into Grafana, so every
embedded panel said "dashboard not found". ``serve-app manifests`` (``make manifests``) writes
the same dashboards, from the same factory (``grafana_dashboard_factory``), to
``cluster/monitoring/ray-dashboards/``; kustomize wraps each in a ConfigMap labelled
``grafana_dashboard: "1"`` (``cluster/monitoring/kustomization.yaml``).

Which dashboards: the ones the Ray dashboard's frontend embeds. Its sources (shipped with Ray as
the bundle's source map, ``dashboard/client/build/static/js/main.*.js.map``) read
``dashboardUids.default`` (Metrics view "Core" tab, overview cards: Node Count, Cluster
Utilization), ``dashboardUids.serve`` (the Serve page's application and system charts),
``dashboardUids.serveDeployment`` (the Serve replica charts and "View in Grafana") and
``dashboardUids.data`` (the Metrics view's "Ray Data" tab, shown whenever the head reports a data
uid, which it always does). The head also generates the train, Serve LLM, SGLang and Data LLM
dashboards, but no page of the frontend embeds them, so they are not shipped (they would only add
~700 KB of ConfigMaps). ``tests/test_ray_dashboards.py`` reads the frontend's sources and fails
when the set it embeds changes.

The JSON is Ray's, parsed and written back with sorted keys and no whitespace (deterministic; the
largest, the data dashboard, then stays under the 256 KiB that a client-side ``kubectl apply``
can store in its last-applied annotation). Ray's per-dashboard environment overrides
(``RAY_GRAFANA_<NAME>_DASHBOARD_UID``, ``..._GLOBAL_FILTERS``, ``..._LOG_LINK_URL``) are ignored
here, as they are unset on the head: the uids are Ray's defaults, the ones the head reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Ray's dashboard modules are heavy; serve_app.tools.manifests imports this module only when it
# generates or checks the files.
import ray
from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory
from ray.dashboard.modules.metrics.dashboards.data_dashboard_panels import data_dashboard_config
from ray.dashboard.modules.metrics.dashboards.default_dashboard_panels import default_dashboard_config
from ray.dashboard.modules.metrics.dashboards.serve_deployment_dashboard_panels import serve_deployment_dashboard_config
from ray.dashboard.modules.metrics.default_impl import get_serve_dashboard_config

OUTPUT_DIR = Path("cluster/monitoring/ray-dashboards")
CONFIGMAP_PREFIX = "ray-grafana-dashboard-"
# The factory reads these for every dashboard (grafana_dashboard_factory._read_configs_for_dashboard).
_OVERRIDE_ENV = re.compile(r"RAY_GRAFANA_\w+_DASHBOARD_(UID|GLOBAL_FILTERS)|RAY_GRAFANA_\w+_LOG_LINK_URL")


@dataclass(frozen=True)
class RayDashboard:
    key: str  # the head's key in /api/grafana_health dashboard_uids (the frontend camel-cases it)
    config: object  # Ray's DashboardConfig: name, default_uid, panels
    generate: Callable[[], tuple[str, str]]  # Ray's factory function: (JSON, uid)

    @property
    def uid(self) -> str:
        return self.config.default_uid

    @property
    def frontend_key(self) -> str:
        first, *rest = self.key.split("_")
        return first + "".join(part.title() for part in rest)

    @property
    def filename(self) -> str:  # the name the head gives the file in its session directory
        return f"{self.key}_grafana_dashboard.json"

    @property
    def path(self) -> Path:
        return OUTPUT_DIR / self.filename

    @property
    def configmap_name(self) -> str:
        return CONFIGMAP_PREFIX + self.key.replace("_", "-")


def shipped() -> list[RayDashboard]:
    """The dashboards the Ray dashboard's frontend embeds, in the head's order."""
    return [
        RayDashboard("default", default_dashboard_config, factory.generate_default_grafana_dashboard),
        RayDashboard("serve", get_serve_dashboard_config(), factory.generate_serve_grafana_dashboard),
        RayDashboard("serve_deployment", serve_deployment_dashboard_config,
                     factory.generate_serve_deployment_grafana_dashboard),
        RayDashboard("data", data_dashboard_config, factory.generate_data_grafana_dashboard),
    ]


@contextlib.contextmanager
def _ray_defaults() -> Iterator[None]:
    """The factory's per-dashboard environment overrides unset for the duration."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if _OVERRIDE_ENV.fullmatch(k)}
    try:
        yield
    finally:
        os.environ.update(saved)


def normalise(content: str) -> str:
    """A dashboard's JSON as shipped: sorted keys, no whitespace, one trailing newline."""
    return json.dumps(json.loads(content), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def render(dashboard: RayDashboard) -> str:
    with _ray_defaults():
        content, uid = dashboard.generate()
    if uid != dashboard.uid or json.loads(content).get("uid") != uid:
        raise ValueError(f"Ray generated uid {uid!r} for {dashboard.key}, expected {dashboard.uid!r}")
    return normalise(content)


def generated_files(pinned_ray_version: str) -> dict[Path, str]:
    """Relative path -> content of every shipped Ray dashboard. Refuses a Ray other than the pin:
    the dashboards must be the ones the cluster's Ray serves, not whatever is installed."""
    installed = ray.__version__
    if installed != pinned_ray_version:
        raise RuntimeError(f"the installed Ray is {installed}, pyproject.toml pins {pinned_ray_version}: "
                           "generate Ray's dashboards from the pinned Ray (make venv)")
    return {d.path: render(d) for d in shipped()}
