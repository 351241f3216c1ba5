"""`throttle exporter`: totals flushed by many worker processes, and live gauges from Redis."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from tests.apps.ledger import build
from tests.support.monitoring import (
    POOLED,
    exporter,
    ledger_tool,
    scrape,
    seed_pooled_state,
    total,
    value,
)
from tests.support.servers import ROOT, free_port
from tests.support.workers import ledger
from throttle import outcome

pytestmark = [pytest.mark.redis]

DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "throttle.json"
RULES = ROOT / "config" / "prometheus-rules.yml"


def declared(text: str) -> set[str]:
    """Every series name a /metrics page declares (with a histogram's and counter's suffixes)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = {"histogram": ["_bucket", "_sum", "_count"], "counter": ["", "_total"]}
            names |= {name + suffix for suffix in suffixes.get(kind, [""])}
    return names


def decisions(samples: dict[Any, float], tool: str) -> dict[str, float | None]:
    return {kind: total(samples, "throttle_decisions_total", tool=tool, outcome=kind)
            for kind in ("admit", "delay", "fallback")}


@pytest.mark.celery
@pytest.mark.slow
def test_scraped_totals_equal_the_decisions_two_worker_processes_made(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_url: str,
    redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    config = {"tools": {"burst": ledger_tool(["5/1s"], "2s")}}
    cluster = make_cluster(config)
    cluster.start(2, concurrency=2)
    _, _, tasks = build(cluster.env)
    with exporter(tmp_path, config, redis_url=redis_url, broker_url=redis_dbs[0],
                  prefix=prefix) as url:
        results = [tasks["burst"].delay(n=n) for n in range(60)]
        for result in results:
            result.get(timeout=60)
        runs = ledger(redis_client, prefix)
        expected = {
            "admit": float(len(runs)),
            "delay": float(sum(run["delays"] for run in runs)),
            "fallback": float(sum(outcome(r) == "fallback" for r in results)),
        }
        deadline = time.monotonic() + 15  # workers flush every second
        while (scraped := decisions(scrape(url), "burst")) != expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        samples = scrape(url)
    pids = {run["pid"] for run in runs}
    print(f"\nexporter: expected {expected}, scraped {scraped}; bodies ran in {len(pids)} "
          "processes")
    assert scraped == expected
    assert expected["admit"] >= 10 and expected["delay"] >= 1 and expected["fallback"] >= 1
    assert len(pids) >= 2
    assert value(samples, "function_rate_limit_exceeded_total", tool="burst",
                 tool_name="burst") == expected["fallback"]
    assert value(samples, "throttle_delay_seconds_count", tool="burst") == expected["delay"]
    assert value(samples, "function_call_duration_seconds_count", tool="burst", tool_name="burst",
                 status="success") == expected["admit"]
    assert value(samples, "throttle_queue_depth", tool="burst") == 0
    assert value(samples, "throttle_store_errors_total") == 0
    in_window = value(samples, "tool_requests_in_window", tool="burst", tool_name="burst")
    assert in_window is not None and 0 <= in_window <= 5


def test_gauges_show_window_use_reservations_pool_use_cooldown_and_queue_depth(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    seed_pooled_state(redis_url, prefix, *redis_dbs)
    with exporter(tmp_path, POOLED, redis_url=redis_url, broker_url=redis_dbs[0],
                  prefix=prefix) as url:
        samples = scrape(url)
        url_text = httpx.get(url, timeout=10).text
    assert value(samples, "throttle_exporter_redis_up") == 1
    assert value(samples, "tool_requests_in_window", tool="light", tool_name="light") == 10
    # 2 calls x 2.5
    assert value(samples, "tool_requests_in_window", tool="heavy", tool_name="heavy") == 5
    assert value(samples, "throttle_reserved_slots", tool="light") == 2
    assert value(samples, "throttle_queue_depth", tool="light") == 3
    assert value(samples, "throttle_queue_depth", tool="heavy") == 0
    assert value(samples, "throttle_pool_units_in_window", pool="shared", window="1m") == 15
    assert value(samples, "throttle_pool_usage", **{"pool": "shared", "class": "batch"}) == 0.75
    assert value(samples, "throttle_pool_usage",
                 **{"pool": "shared", "class": "critical"}) == 0.375
    for tool in ("light", "heavy"):  # a pooled tool's cooldown is the pool's
        cooldown = value(samples, "throttle_cooldown_seconds", tool=tool)
        assert cooldown is not None and 20 < cooldown <= 30
    assert value(samples, "throttle_limit_per_second", tool="light") == pytest.approx(10 / 60)
    assert total(samples, "throttle_decisions_total", tool="light", outcome="admit") == 0
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    recorded = {rule["record"] for group in rules for rule in group["rules"] if "record" in rule}
    for source, exprs in (
        ("dashboard", [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
                       for target in panel["targets"]]),
        ("alerts", [rule["expr"] for group in rules for rule in group["rules"]]),
    ):
        text = " ".join(exprs)
        for name in recorded:  # the recording rules' own names (tested by promtool)
            text = text.replace(name, "")
        named = set(re.findall(r"\b(?:throttle|tool|function)_[a-z_]+", text)) - {"tool_name"}
        assert named and named - declared(url_text) == set(), \
            f"the {source} names metrics nobody exports"


def test_the_exporter_reports_redis_down_instead_of_failing_the_scrape(
    prefix: str, tmp_path: Path,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with exporter(tmp_path, POOLED, redis_url=nowhere, broker_url=nowhere, prefix=prefix) as url:
        samples = scrape(url)
    assert value(samples, "throttle_exporter_redis_up") == 0
