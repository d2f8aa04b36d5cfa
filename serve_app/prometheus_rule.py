"""The Kubernetes PrometheusRule generated from the local Prometheus rule file.

``configs/prometheus/alerts.yml`` is the one source of the alert rules: the local Prometheus
loads it as is, promtool unit-tests it, and this module wraps its ``groups`` in a
``monitoring.coreos.com/v1`` PrometheusRule for the prometheus-operator
(``cluster/monitoring/prometheusrule.yaml``). ``--check`` fails when the committed manifest
differs from what the rule file gives, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "configs" / "prometheus" / "alerts.yml"
MANIFEST = ROOT / "cluster" / "monitoring" / "prometheusrule.yaml"
HEADER = ("# GENERATED from configs/prometheus/alerts.yml by `make manifests`"
          " (python -m serve_app.prometheus_rule). Do not edit.\n")


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (PromQL) as ``|`` blocks, readable in the manifest as in the source."""


_BlockStrings.add_representer(
    str, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render(rules_path: Path = RULES) -> str:
    groups = yaml.safe_load(rules_path.read_text())["groups"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the manifest is out of date")
    args = parser.parse_args(argv)
    wanted = render()
    if args.check:
        if not MANIFEST.exists() or MANIFEST.read_text() != wanted:
            print(f"{MANIFEST.relative_to(ROOT)} is out of date: run `make manifests`", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(wanted)
    print(f"wrote {MANIFEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
