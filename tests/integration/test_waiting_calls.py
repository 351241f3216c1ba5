"""Calls, not decisions: the calls workers hold with an ETA, counted exactly across workers."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from tests.apps.ledger import build
from tests.support.monitoring import exporter, ledger_tool, scrape, total, value
from tests.support.servers import write_config
from tests.support.workers import ledger
from throttle import task
from throttle.cli import main
from throttle.monitor import metrics

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def waiting(samples: dict[Any, float]) -> tuple[float | None, float | None]:
    return (total(samples, "throttle_waiting_calls", tool="paced"),
            value(samples, "throttle_queue_depth", tool="paced"))


def test_the_metrics_read_the_delay_count_header_the_task_writes() -> None:
    assert metrics.DELAYS == task.DELAYS


def test_every_call_held_by_two_workers_is_counted_once_then_leaves_the_count_when_it_runs(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_url: str,
    redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    # 5 calls per 3 s: of 20 calls, 5 run at once and 15 wait 3, 6 and 9 s for their slots.
    config = {"tools": {"paced": ledger_tool(["5/3s"], "30s")}}
    cluster = make_cluster(config)
    cluster.start(2, concurrency=2)
    _, _, tasks = build(cluster.env)
    with exporter(tmp_path, config, redis_url=redis_url, broker_url=redis_dbs[0],
                  prefix=prefix) as url:
        results = [tasks["paced"].delay(n=n) for n in range(20)]
        deadline = time.monotonic() + 15
        while (held := waiting(scrape(url))) != (15, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        during = scrape(url)
        shown = CliRunner().invoke(main, [
            "status", "--redis-url", redis_url, "--broker-url", redis_dbs[0], "--prefix", prefix,
            "--config", str(write_config(config, tmp_path / "tools.toml"))],
            env={"COLUMNS": "80"}).output
        for result in results:
            result.get(timeout=60)
        time.sleep(2 * metrics.FLUSH_INTERVAL_S + 0.5)  # the last decisions' flush
        after = scrape(url)
    runs = ledger(redis_client, prefix)
    delayed_runs = sum(run["delays"] > 0 for run in runs)
    decisions = sum(run["delays"] for run in runs)
    print(f"\nwaiting while held {held}; {len(runs)} runs, {delayed_runs} delayed calls, "
          f"{decisions} delay decisions; held by {len({run['pid'] for run in runs})} processes")
    assert held == (15, 0), "15 calls were held in workers with an ETA, none queued"
    assert total(during, "throttle_waiting_calls", tool="paced", reason="reserved") == 15
    row = next(line for line in shown.splitlines() if line.strip().startswith("paced "))
    print(shown)
    # tool, window, rsv, queue, wait: the 15 held calls hold 15 reserved slots
    assert re.split(r"\s{2,}", row.strip())[2:5] == ["15", "0", "15"]
    assert len(runs) == 20 and delayed_runs == 15
    assert waiting(after) == (0, 0)
    assert total(after, "throttle_delayed_calls_total", tool="paced") == delayed_runs
    assert total(after, "throttle_decisions_total", tool="paced", outcome="delay") == decisions
    assert value(after, "throttle_decisions_total", tool="paced", outcome="admit",
                 reason="reservation") == delayed_runs
