"""docs/gate.md: with `on_store_error = "delay"` a call whose gate store is down is re-published
with exponential backoff and jitter until its deadline, then falls back.

A real worker whose gate Redis is a port where nothing listens; 6 calls with a 12 s deadline.
The worker's log says when it took each message (`Task ... received`). A re-published call is
taken at once and held until its countdown ends, so delivery k + 1 comes right after try k
ran: after the first gap (the first try itself), the gaps between one call's deliveries are
its backoffs, 2^k x [0.5, 1) s for the k-th (plus delivery latency), different from call to
call (jitter), and the last try comes before the deadline.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from datetime import datetime
from typing import Any

import pytest
import redis

from tests.apps.ledger import build
from tests.integration.test_celery_flow import tool
from tests.support.servers import free_port
from tests.support.workers import ledger
from throttle import outcome
from throttle.task import fallback_reason

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

DEADLINE_S = 12.0
RECEIVED = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] "
                      r"Task tool\.backoff\[([0-9a-f-]+)\] received")


def test_the_delay_policy_backs_off_exponentially_with_jitter_until_the_deadline(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_url: str,
) -> None:
    config = {"tools": {"backoff": tool(["10/1s"], f"{DEADLINE_S:g}s", on_store_error="delay")}}
    cluster = make_cluster(config, env={"THROTTLE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                                        "THROTTLE_TEST_LEDGER_URL": redis_url})
    cluster.start(1, concurrency=2)
    _, _, tasks = build(cluster.env)
    results = [tasks["backoff"].delay(n=n) for n in range(6)]
    for result in results:
        result.get(timeout=DEADLINE_S + 20)
    deliveries: dict[str, list[float]] = defaultdict(list)
    for stamp, task_id in RECEIVED.findall(cluster.logs()):
        deliveries[task_id].append(
            datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    gaps = {task_id: [b - a for a, b in itertools.pairwise(times)][1:]
            for task_id, times in deliveries.items()}
    for result in results:
        print(f"\n{result.id[:8]}: backoffs " +
              " ".join(f"{gap:.2f}" for gap in gaps[result.id]) +
              f" s; answered {result.date_done.timestamp() - deliveries[result.id][0]:.2f} s"
              " after its first delivery")
    assert [outcome(r) for r in results] == ["fallback"] * 6
    assert {fallback_reason(r) for r in results} == {"store_unavailable"}
    assert ledger(redis_client, prefix) == []
    for result in results:
        own = gaps[result.id]
        assert len(own) >= 3, own
        for k, gap in enumerate(own[:3]):  # 0.5-1 s, 1-2 s, 2-4 s: none cut by the deadline
            assert 0.5 * 2**k - 0.05 <= gap <= 2**k + 0.5, (k, own)
        span = deliveries[result.id][-1] - deliveries[result.id][0]
        assert span <= DEADLINE_S, (span, own)  # the last try comes before the deadline
    firsts = sorted(gaps[r.id][0] for r in results)
    assert firsts[-1] - firsts[0] > 0.05, f"no jitter: {firsts}"
