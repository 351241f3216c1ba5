"""The Grafana dashboard: a tool variable, one tool label, and only metrics throttle exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.programs import require
from tests.support.servers import ROOT
from throttle.monitor.exporter import counters, gauges
from throttle.monitor.snapshot import Snapshot

DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "throttle.json"
RULES = ROOT / "config" / "prometheus-rules.yml"
SELECTOR = re.compile(r"\b((?:tool:)?(?:throttle|tool|function)_[a-z_:0-9]*[a-z0-9])(\{[^}]*\})?")


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def expressions() -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel["targets"]]
            for panel in dashboard()["panels"]}


def exported() -> dict[str, set[str]]:
    """Every series name the exporter serves (with counter and histogram suffixes) and the
    labels it carries, read from the exporter's own collectors."""
    snapshot = Snapshot(at_s=0.0, tools=())
    names: dict[str, set[str]] = {"throttle_exporter_redis_up": set()}
    for family in [*counters(snapshot), *gauges(snapshot)]:
        labels = set(getattr(family, "_labelnames", ()))
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    for group in groups:
        for rule in group["rules"]:
            if "record" in rule:
                names[rule["record"]] = {"tool"}
    return names


def test_the_dashboard_has_a_tool_variable_read_from_an_exported_label() -> None:
    [variable] = dashboard()["templating"]["list"]
    assert (variable["name"], variable["type"]) == ("tool", "query")
    assert variable["includeAll"] and variable["multi"]
    match = re.fullmatch(r"label_values\((\w+), tool\)", variable["query"]["query"])
    assert match and "tool" in exported()[match.group(1)]


def test_every_expression_names_exported_metrics_and_filters_by_the_one_tool_label() -> None:
    names = exported()
    for title, exprs in expressions().items():
        for expr in exprs:
            assert "tool_name" not in expr, f"{title}: use the label `tool`, not `tool_name`"
            used = {metric for metric, _ in SELECTOR.findall(expr)}
            assert used and used <= set(names), f"{title}: {used - set(names)} not exported"
            for metric, matchers in SELECTOR.findall(expr):
                if "tool" in names.get(metric, set()):
                    assert 'tool=~"$tool"' in matchers, f"{title}: {metric} ignores $tool"


def test_the_panels_operators_asked_for_are_there_and_explain_themselves() -> None:
    panels = {panel["title"]: panel for panel in dashboard()["panels"]}
    assert any("tool:throttle_fallback_ratio:rate5m" in e for e in expressions()["Fallback ratio"])
    waiting = " ".join(expressions()["Calls waiting, by reason"])
    assert "sum by (tool, reason) (throttle_waiting_calls" in waiting
    assert "throttle_queue_depth" in waiting
    limit = " ".join(expressions()["Admitted rate vs effective limit"])
    assert "throttle_effective_limit_per_second" in limit
    assert "Above 100% is not over-admission" in panels["Pool use by class"]["description"]
    adaptive = " ".join(expressions()["Adaptive limits: configured vs effective"])
    assert "throttle_adaptive_limit" in adaptive
    why = " ".join(expressions()["Adaptive limits: why each last moved"])
    assert "by (target, reason) (throttle_adaptive_moved_at_seconds)" in why
    ids = [panel["id"] for panel in panels.values()]
    assert len(ids) == len(set(ids))
    assert all(panel["description"] for panel in panels.values())


def test_promtool_parses_every_expression_of_the_dashboard(tmp_path: Path) -> None:
    promtool = require("promtool")
    rules = [{"record": f"dashboard:panel_{index}", "expr": expr.replace("$tool", ".*")}
             for index, expr in enumerate(e for exprs in expressions().values() for e in exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
