"""The binding burst on every Celery worker pool: prefork, threads, gevent, eventlet, solo.

I/O-bound tools run on `-P gevent -c 50` or `-P threads`: many calls of one node meet the
gate, re-publish their delays and ack their messages at once. Each pool must keep the
windows exact, run no body twice and lose no call.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.integration.test_celery_flow import burst, tool
from tests.support.pools import missing
from tests.support.workers import check_ledger

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

# 200 calls are four windows' worth: more than any setup runs at once (150), so the limit
# binds in every window and every node starts full.
LIMIT, WINDOW_S, CALLS = 50, 2.0, 200
# name: (pool, nodes, concurrency, body seconds). Green pools and threads run many calls of
# a node at once (the I/O-bound case); every setup can run more than the limit, so it binds.
# gevent-150: more calls at once than a redis-py pool opens by default (100).
SETUPS = {
    "prefork": ("prefork", 2, 2, 0.02), "threads": ("threads", 2, 8, 0.2),
    "gevent": ("gevent", 3, 50, 0.2), "gevent-150": ("gevent", 1, 150, 0.5),
    "eventlet": ("eventlet", 2, 50, 0.2), "solo": ("solo", 2, 1, 0.02),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_binding_burst_holds_exactly_on_every_worker_pool(
    setup: str, make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    pool, nodes, concurrency, body_s = SETUPS[setup]
    if missing(pool):
        pytest.skip(f"{pool} is not installed (pip install 'throttle[{pool}]')")
    cluster = make_cluster({"tools": {"burst": tool([f"{LIMIT}/2s"], "60s")}},
                           env={"THROTTLE_TEST_BODY_S": str(body_s)})
    results, _ = burst(cluster, "burst", CALLS)  # queued first: every node starts full
    cluster.start(nodes, concurrency=concurrency, extra=["-P", pool])
    check = check_ledger(results, redis_client, prefix, window_s=WINDOW_S, timeout_s=60)
    logs = cluster.logs()
    errors = [line for line in logs.splitlines() if "ERROR" in line or "CRITICAL" in line]
    print(f"\n-P {pool} x{nodes} -c {concurrency}, {CALLS} at {LIMIT}/2s: {check}; "
          f"{len(errors)} error lines {errors[:3]}")
    assert check.ended == {"result": CALLS}
    assert check.run_twice == 0
    assert check.most == LIMIT  # the limit binds, and holds
    assert errors == []
