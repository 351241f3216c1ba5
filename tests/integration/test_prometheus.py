"""A real Prometheus, configured by config/prometheus.yml, scrapes `throttle exporter`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from tests.apps.ledger import build
from tests.support.monitoring import exporter, ledger_tool
from tests.support.needs import program
from tests.support.servers import ROOT, free_port, server
from tests.support.workers import ledger
from throttle import outcome

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def prometheus_config(exporter_url: str, path: Path) -> Path:
    """config/prometheus.yml scraping the test's exporter every 0.5 s (Flower is not run here),
    with its rule files (named relative to config/) given as absolute paths."""
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"] = {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
    config["rule_files"] = [str(ROOT / "config" / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    target = exporter_url.removeprefix("http://").removesuffix("/metrics")
    jobs["throttle"]["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [jobs["throttle"]]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def query(base: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10)
    body = answer.raise_for_status().json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_reads_the_decisions_of_a_burst_back_from_the_exporter(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_url: str,
    redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    binary = program("prometheus", "prometheus")
    config = {"tools": {"burst": ledger_tool(["5/1s"], "2s")}}
    cluster = make_cluster(config)
    cluster.start(1, concurrency=2)
    _, _, tasks = build(cluster.env)
    with exporter(tmp_path, config, redis_url=redis_url, broker_url=redis_dbs[0],
                  prefix=prefix) as url:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [binary, f"--config.file={prometheus_config(url, tmp_path / 'prometheus.yml')}",
               f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        with server(cmd, tmp_path / "prometheus.log", f"{base}/-/ready", timeout_s=45):
            results = [tasks["burst"].delay(n=n) for n in range(40)]
            for result in results:
                result.get(timeout=60)
            runs = ledger(redis_client, prefix)
            expected = {"admit": len(runs), "delay": sum(run["delays"] for run in runs),
                        "fallback": sum(outcome(r) == "fallback" for r in results)}
            promql = 'sum by (outcome) (throttle_decisions_total{tool="burst", job="throttle"})'
            deadline = time.monotonic() + 30
            while True:
                seen = {row["metric"]["outcome"]: int(float(row["value"][1]))
                        for row in query(base, promql)}
                if seen == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            up = query(base, 'up{job="throttle"}')
            groups = httpx.get(f"{base}/api/v1/rules", timeout=10).raise_for_status().json()
    rules = {rule["name"]: rule["health"] for group in groups["data"]["groups"]
             for rule in group["rules"]}
    print(f"\nprometheus: expected {expected}, queried {seen}")
    assert seen == expected
    assert [row["value"][1] for row in up] == ["1"]
    assert "ThrottlePoolAtCap" in rules and "tool:throttle_fallback_ratio:rate5m" in rules
    assert set(rules.values()) <= {"ok", "unknown"}, rules
