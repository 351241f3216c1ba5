"""The Prometheus rules and alerts: valid for promtool, and behaving as their unit tests say."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.support.programs import require
from tests.support.servers import ROOT

CONFIG = ROOT / "config"
RULES = CONFIG / "prometheus-rules.yml"
ALERTS = {"ThrottleFallbackRatioHigh", "ThrottleStoreErrors", "ThrottleExporterRedisDown",
          "ThrottleExporterDown", "ThrottleCooldownActive", "ThrottlePoolAtCap"}
RECORDED = {"tool:throttle_fallback_ratio:rate5m", "tool:throttle_delayed_call_ratio:rate5m"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], cwd=CONFIG, capture_output=True,
                          text=True, timeout=60, check=False)


def rules() -> list[dict[str, str]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_prometheus_yml_loads_the_rules_and_promtool_accepts_both() -> None:
    config = yaml.safe_load((CONFIG / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == ["prometheus-rules.yml"]
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout


def test_docker_compose_mounts_the_rules_beside_prometheus_yml() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./config/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./config/prometheus-rules.yml:/etc/prometheus/prometheus-rules.yml:ro" in volumes


def test_the_rules_record_both_ratios_and_alert_on_each_failure() -> None:
    assert {rule["alert"] for rule in rules() if "alert" in rule} == ALERTS
    assert {rule["record"] for rule in rules() if "record" in rule} >= RECORDED
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_alerts_fire_and_clear_when_their_unit_tests_say() -> None:
    tested = promtool("test", "rules", "prometheus-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = (CONFIG / "prometheus-rules.test.yml").read_text(encoding="utf-8")
    assert set(re.findall(r"alertname: (\w+)", cases)) == ALERTS, "every alert has a test"
    assert all(name in cases for name in RECORDED), "every ratio has a test"
