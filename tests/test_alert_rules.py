"""The alert rules with Prometheus's own tooling: ``promtool check`` and ``promtool test rules``
(tests/promtool/alerts_test.yml), every alert shown both firing and silent, and the Kubernetes
PrometheusRule identical to the rule file it is generated from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from serve_app.tools import alert_rules, manifests
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "configs" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = ROOT / "configs" / "prometheus" / "prometheus.yml"
UNIT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True)


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_rule_file_and_local_config_are_valid():
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in rules.stdout
    config = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent():
    cases = [case for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
             for case in group.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alert_names() - firing == set(), "alerts never shown firing"
    assert alert_names() - silent == set(), "alerts never shown silent"


def test_prometheus_rule_is_generated_from_the_rule_file():
    manifest = yaml.safe_load((ROOT / alert_rules.MANIFEST).read_text())
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert alert_rules.MANIFEST not in manifests.out_of_date(ROOT), "run `make manifests`"


def test_a_changed_rule_file_makes_the_manifest_stale(tmp_path):
    for path in (alert_rules.RULES, alert_rules.MANIFEST):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((ROOT / path).read_text())
    assert alert_rules.render(tmp_path) == (tmp_path / alert_rules.MANIFEST).read_text()
    rules = tmp_path / alert_rules.RULES
    rules.write_text(rules.read_text().replace("> 0.05", "> 0.10"))
    assert alert_rules.render(tmp_path) != (tmp_path / alert_rules.MANIFEST).read_text()
