"""`SCRIPT FLUSH` every 2 s while real workers take a burst: NOSCRIPT never reaches a task.

The gate runs its scripts with EVALSHA; after a flush the server answers NOSCRIPT and
redis-py loads the script again and repeats the call. 1,000 calls of a tool limited to
50/1s, queued before the workers start, go through three `celery worker` nodes (prefork 2)
on a private Redis (gate, broker and results): most calls that run are delayed to their
slots first, and those whose slot would miss the 15 s deadline fall back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import redis
from celery import states

from tests.integration.test_celery_flow import burst, tool
from tests.support.workers import ledger
from throttle import outcome
from throttle.task import fallback_reason
from throttle.windows import most_in_window

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

CALLS, LIMIT, WINDOW_S = 1000, 50, 1.0
FLUSH_EVERY_S = 2.0
DEADLINE = "15s"


def wait_all(results: list[Any], timeout_s: float) -> Counter[str]:
    """Wait until every call has a final state; count the states (PENDING: never ended)."""
    deadline = time.monotonic() + timeout_s
    for result in results:
        while result.state not in states.READY_STATES and time.monotonic() < deadline:
            time.sleep(0.05)
    return Counter(result.state for result in results)


def test_script_flush_every_2s_mid_burst_reaches_no_task_and_breaks_no_window(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    config = {"tools": {"burst": tool([f"{LIMIT}/1s"], DEADLINE)}}
    cluster = make_cluster(config)
    flushes = 0
    stop = threading.Event()

    def flush_repeatedly() -> None:
        nonlocal flushes
        while not stop.wait(FLUSH_EVERY_S):
            redis_client.script_flush()
            flushes += 1

    flusher = threading.Thread(target=flush_repeatedly)
    flusher.start()
    try:
        started = time.monotonic()
        results, _ = burst(cluster, "burst", CALLS)  # queued before any worker runs
        enqueue_s = time.monotonic() - started
        cluster.start(3, concurrency=2)
        states_seen = wait_all(results, timeout_s=45)
    finally:
        stop.set()
        flusher.join()

    noscript = redis_client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0)
    outcomes = Counter(outcome(r) for r in results if r.state == states.SUCCESS)
    reasons = Counter(fallback_reason(r) for r in results if outcome(r) == "fallback")
    runs = ledger(redis_client, prefix)
    most = most_in_window([run["admitted_at"] for run in runs], WINDOW_S)
    delayed = sum(run["delays"] > 0 for run in runs)
    logs = cluster.logs()
    noscript_in_logs = logs.count("NOSCRIPT") + logs.count("NoScriptError")
    store_errors_in_logs = logs.count("on_store_error")
    errors = CALLS - states_seen[states.SUCCESS] + sum(
        n for reason, n in reasons.items() if reason != "deadline"
    )
    print(
        f"\nSCRIPT FLUSH every {FLUSH_EVERY_S:.0f} s (x{flushes}, NOSCRIPT answered "
        f"{noscript} times), {CALLS} calls at {LIMIT}/1s queued in {enqueue_s:.1f} s: states "
        f"{dict(states_seen)}, {dict(outcomes)} ({delayed} run after a delay), fallback "
        f"reasons {dict(reasons)}; errors reaching tasks {errors} (NOSCRIPT in worker logs "
        f"{noscript_in_logs}, store errors {store_errors_in_logs}), most admitted in a "
        f"window {most}/{LIMIT}"
    )
    assert flushes >= 3 and noscript >= flushes
    assert states_seen == {states.SUCCESS: CALLS}
    assert set(reasons) <= {"deadline"}
    assert errors == noscript_in_logs == store_errors_in_logs == 0
    assert len(runs) == outcomes["result"] and delayed >= 100  # the delay path ran
    assert most <= LIMIT
