"""The Kubernetes PrometheusRule generated from the local Prometheus rule file.

``configs/prometheus/alerts.yml`` is the one source of the alert rules: the local Prometheus
loads it as is, promtool unit-tests it, and this module wraps its ``groups`` in a
``monitoring.coreos.com/v1`` PrometheusRule for the prometheus-operator
(``cluster/monitoring/prometheusrule.yaml``), one of the files ``serve-app manifests``
(``make manifests``) generates and ``--check`` compares, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import yaml

RULES = Path("configs/prometheus/alerts.yml")
MANIFEST = Path("cluster/monitoring/prometheusrule.yaml")
HEADER = "# GENERATED from configs/prometheus/alerts.yml by `make manifests`. Do not edit.\n"


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (PromQL) as ``|`` blocks, readable in the manifest as in the source."""


_BlockStrings.add_representer(
    str, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render(root: Path) -> str:
    """The PrometheusRule manifest for the rule file of the checkout at ``root``."""
    groups = yaml.safe_load((root / RULES).read_text())["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "serve-app-alerts",
            "labels": {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": "monitoring"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(manifest, Dumper=_BlockStrings, sort_keys=False, width=120)
