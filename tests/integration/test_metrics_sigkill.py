"""docs/observability.md: "A process killed with SIGKILL loses at most its last second of
counts." A worker admits a steady 10 calls a second; after about 3 s its pool processes and
then the worker itself are SIGKILLed. Every admission the stats in Redis miss must be one
whose body started in the last flush interval (1 s) before the kill.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import redis

from tests.integration.test_celery_flow import burst, tool
from tests.support.workers import ledger
from throttle.keys import stats_key
from throttle.monitor import metrics
from throttle.monitor.stats import parse_totals

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def test_a_sigkilled_worker_loses_at_most_its_last_second_of_counts(
    make_cluster: Any, redis_client: redis.Redis, prefix: str,
) -> None:
    cluster = make_cluster({"tools": {"counted": tool(["10/1s"], "1m")}})
    cluster.start(1, concurrency=2)
    burst(cluster, "counted", 100)  # 10 s of admissions at 10/1s
    deadline = time.monotonic() + 30
    while redis_client.llen(f"{prefix}:ledger") < 30:
        assert time.monotonic() < deadline, "the worker ran too few bodies"
        time.sleep(0.05)
    time.sleep(0.5)  # between two batches of admissions
    pids = {run["pid"] for run in ledger(redis_client, prefix)}
    for pid in pids:  # the pool processes (they count), then the worker itself
        os.kill(pid, signal.SIGKILL)
    os.kill(cluster.procs[0].pid, signal.SIGKILL)
    sec, usec = redis_client.time()
    killed_at = sec + usec / 1e6
    cluster.procs[0].wait(timeout=10)
    time.sleep(metrics.FLUSH_INTERVAL_S + 0.5)  # nothing may flush any more
    runs = ledger(redis_client, prefix)
    counted = parse_totals(redis_client.hgetall(stats_key(prefix, "counted"))).outcome("admit")
    last_second = [run for run in runs if run["at"] > killed_at - metrics.FLUSH_INTERVAL_S - 0.2]
    lost = len(runs) - counted
    print(f"\nSIGKILL after {len(runs)} bodies: {counted} admissions counted, {lost} lost; "
          f"{len(last_second)} bodies started in the last {metrics.FLUSH_INTERVAL_S:g} s")
    assert metrics.FLUSH_INTERVAL_S == 1.0
    assert counted > 0
    assert 0 <= lost <= len(last_second)
