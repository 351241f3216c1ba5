"""Worker loss and broker cuts during a burst: every call ends once, none lost, none over."""

from __future__ import annotations

import os
import signal
import threading
import time
from itertools import accumulate
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery.exceptions import TimeoutError

from tests.apps.ledger import build
from tests.integration.test_celery_flow import burst, tool
from tests.support.pools import GEVENT, PREFORK, WorkerPool, pool_params
from tests.support.relay import Relay
from tests.support.workers import ledger
from throttle import outcome, recovery
from throttle.task import fallback_reason
from throttle.windows import most_in_window

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def finish(results: list[Any], timeout_s: float) -> dict[str, int]:
    """Wait for every call; count results, fallbacks, and calls that never ended ("lost")."""
    deadline = time.monotonic() + timeout_s
    counts = {"result": 0, "fallback": 0, "lost": 0}
    for result in results:
        try:
            result.get(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            counts["lost"] += 1
        else:
            counts[outcome(result)] += 1
    return counts


# kombu's Redis transport takes messages with BRPOP. A consumer whose connection dies while
# it waits in BRPOP (or that is killed before it records the message as unacked) loses the
# message it was handed. Throttle registers every call and re-publishes those the gate has
# not seen by their deadline (throttle/recovery.py), so none may be lost here.


@pytest.mark.parametrize("pool", pool_params(PREFORK, GEVENT))
def test_killing_a_worker_mid_burst_loses_no_call_and_breaks_no_window(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, pool: WorkerPool
) -> None:
    config = {"broker": {"visibility_timeout": "6s"}, "tools": {"burst": tool(["40/2s"], "5s")}}
    cluster = make_cluster(config)
    cluster.start(3, concurrency=pool.concurrency, extra=pool.extra)
    results, _ = burst(cluster, "burst", 300)
    time.sleep(2.5)
    cluster.kill(0)
    counts = finish(results, timeout_s=45)
    runs = ledger(redis_client, prefix)
    admissions = {run["id"]: run["admitted_at"] for run in runs}
    twice = len(runs) - len(admissions)
    most = most_in_window(list(admissions.values()), 2.0)
    # The messages the killed node held are swept back, not left unacked (gevent nodes have
    # no event loop to sweep from: see RestoreLostMessages in throttle/bootsteps.py).
    broker = redis.Redis.from_url(cluster.env["THROTTLE_BROKER_URL"])
    deadline = time.monotonic() + 15
    while broker.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.2)
    left_unacked = broker.hlen("unacked")
    print(f"\nSIGKILL mid-burst (-P {pool.name}): {counts}, bodies run twice: {twice}, "
          f"most admitted in 2 s: {most}, left unacked: {left_unacked}")
    assert counts["result"] + counts["fallback"] + counts["lost"] == 300
    assert counts["lost"] == 0
    assert {run["id"] for run in runs} >= {r.id for r in results if outcome(r) == "result"}
    assert twice <= pool.concurrency  # at most the calls running on the killed node
    assert left_unacked == 0
    assert most <= 40


@pytest.mark.parametrize("pool", pool_params(PREFORK, GEVENT))
def test_cutting_the_broker_connection_while_delays_are_published_loses_no_call(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    pool: WorkerPool,
) -> None:
    broker = urlsplit(redis_dbs[0])
    with Relay(broker.hostname or "127.0.0.1", broker.port or 6379) as relay:
        config = {"broker": {"visibility_timeout": "8s"}, "tools": {"burst": tool(["30/1s"], "7s")}}
        cluster = make_cluster(config, broker_url=f"redis://127.0.0.1:{relay.port}{broker.path}")
        cluster.start(2, concurrency=pool.concurrency, extra=pool.extra)
        results, _ = burst(cluster, "burst", 300)
        stop = threading.Event()

        def cut_repeatedly() -> None:
            for _ in range(3):
                if stop.wait(0.7):
                    return
                relay.cut()

        cutter = threading.Thread(target=cut_repeatedly)
        cutter.start()
        try:
            counts = finish(results, timeout_s=60)
        finally:
            stop.set()
            cutter.join()
    runs = ledger(redis_client, prefix)
    admissions = {run["id"]: run["admitted_at"] for run in runs}
    twice = len(runs) - len(admissions)
    most = most_in_window(list(admissions.values()), 1.0)
    print(f"\nbroker cut x{relay.cuts} (-P {pool.name}): {counts}, bodies run again after "
          f"redelivery: {twice}, "
          f"most admitted in 1 s: {most}")
    assert counts["result"] + counts["fallback"] + counts["lost"] == 300
    assert counts["lost"] == 0
    assert most <= 30


def test_a_concurrency_cap_holds_across_workers_and_recovers_after_a_worker_is_killed(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    capped = tool(["1000/1s"], "20s", concurrency=3, lease_timeout="3s")
    config = {"broker": {"visibility_timeout": "25s"}, "tools": {"capped": capped}}
    cluster = make_cluster(config, env={"THROTTLE_TEST_BODY_S": "0.3"})
    cluster.start(3, concurrency=2)
    results, _ = burst(cluster, "capped", 60)
    time.sleep(1.0)
    # SIGKILL a worker process in the middle of a body (one that started less than 0.15 s
    # ago, of 0.3 s, and has not ended): it dies holding its lease.
    deadline = time.monotonic() + 10
    fresh: list[dict[str, Any]] = []
    while not fresh and time.monotonic() < deadline:
        sec, usec = redis_client.time()
        done = {k.decode() for k in redis_client.hkeys(f"{prefix}:ended")}
        fresh = [run for run in ledger(redis_client, prefix)
                 if run["at"] > sec + usec / 1e6 - 0.15 and run["id"] not in done]
        time.sleep(0.01)
    assert fresh, "no body was running to kill"
    victim = fresh[-1]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    counts = finish(results, timeout_s=60)
    runs = ledger(redis_client, prefix)
    ended = {k.decode(): float(v) for k, v in redis_client.hgetall(f"{prefix}:ended").items()}
    # The killed body never ended (its call ran again later, which set `ended`).
    spans, killed_runs = [], []
    for run in runs:
        killed = run["pid"] == victim and run["at"] < killed_at < ended.get(run["id"], 1e18)
        spans.append((run["at"], killed_at if killed else ended[run["id"]]))
        killed_runs += [run] if killed else []
    assert len(killed_runs) == 1, f"the kill must hit exactly one running body: {killed_runs}"
    killed_id = killed_runs[0]["id"]
    reruns = [run["at"] for run in runs if run["id"] == killed_id][1:]
    assert len(reruns) == 1, (
        f"the killed call ran again, once: {counts}, {killed_runs}; its workers' log:\n"
        + "\n".join(line for line in cluster.logs().splitlines()
                    if killed_id in line or "WorkerLost" in line)[-4000:])
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    levels = list(zip([at for at, _ in edges], accumulate(step for _, step in edges), strict=True))
    most_running = max(level for _, level in levels)
    # The cap recovers (3 bodies at once again) once the dead body's lease expires.
    recovered_at = next((at for at, level in levels if at > killed_at and level == 3), None)
    print(f"\nconcurrency 3 across 3 workers: {counts}, most running at once: {most_running}, "
          f"cap back to 3 after {None if recovered_at is None else recovered_at - killed_at:.1f} s"
          f", the killed call ran again after {reruns[0] - killed_at:.1f} s")
    assert most_running <= 3
    assert counts == {"result": 60, "fallback": 0, "lost": 0}
    assert recovered_at is not None and recovered_at - killed_at <= 3.0 + 2.0


def test_a_call_whose_message_the_broker_lost_is_published_again_and_falls_back(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    config = {"tools": {"lossy": tool(["10/1s"], "2s")}}
    cluster = make_cluster(config)
    cluster.start(1, concurrency=1)
    _, throttle, tasks = build(cluster.env)
    task = tasks["lossy"]
    # A call registered by `.delay()` whose message never reached a worker: enqueued 3 s
    # ago, so its deadline (2 s) has passed; the reaper must find it within REAP_AFTER_S.
    lost_id = "lost-" + prefix
    enqueued_at = time.time() - 3
    headers = {"throttle_enqueued_at": enqueued_at}
    assert task._register(lost_id, {"n": 7}, headers)
    kept = task.delay(n=1)  # decided by the gate: leaves the registry at once
    assert kept.get(timeout=10) == {"n": 1}
    calls, _ = throttle.gate.registry("lossy")
    assert redis_client.zrange(calls, 0, -1) == [lost_id.encode()]
    started = time.monotonic()
    lost = task.AsyncResult(lost_id)
    assert lost.get(timeout=recovery.REAP_AFTER_S + 10) == {"n": -1}
    print(f"\nlost call answered after {time.monotonic() - started:.1f} s: "
          f"{fallback_reason(lost)}")
    assert fallback_reason(lost) == "deadline"
    assert "never reached the gate" in cluster.logs()
    assert redis_client.zcard(calls) == 0
    assert ledger(redis_client, prefix) == [entry for entry in ledger(redis_client, prefix)
                                            if entry["n"] == 1]


def test_a_lost_call_is_answered_about_reap_after_s_past_its_deadline_never_before(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    """README: a call whose message the broker loses answers with its fallback about 5 s
    (REAP_AFTER_S) after its deadline. The reaper looks every REAP_EVERY_S; the round trip
    of a normal call, measured here, bounds what the re-publish itself adds."""
    assert recovery.REAP_AFTER_S == 5.0  # the README's "about 5 s after its deadline"
    deadline_s = 2.0
    cluster = make_cluster({"tools": {"lossy": tool(["10/1s"], f"{deadline_s:g}s")}})
    cluster.start(1, concurrency=1)
    _, _, tasks = build(cluster.env)
    task = tasks["lossy"]
    sent = time.time()
    assert task.delay(n=1).get(timeout=10) == {"n": 1}
    round_trip_s = time.time() - sent
    lost_id = "lost-" + prefix
    enqueued_at = time.time()
    assert task._register(lost_id, {"n": 7}, {"throttle_enqueued_at": enqueued_at})
    lost = task.AsyncResult(lost_id)
    assert lost.get(timeout=deadline_s + recovery.REAP_AFTER_S + 15) == {"n": -1}
    answered_s = lost.date_done.timestamp() - enqueued_at
    due_s = deadline_s + recovery.REAP_AFTER_S
    print(f"\nlost call (deadline {deadline_s:g} s) answered {answered_s:.2f} s after it was "
          f"sent; due at {due_s:g} s, reaper every {recovery.REAP_EVERY_S:g} s, a normal call's "
          f"round trip {round_trip_s:.2f} s")
    assert fallback_reason(lost) == "deadline"
    assert due_s - 0.05 <= answered_s  # never re-published before it counts as lost
    assert answered_s <= due_s + recovery.REAP_EVERY_S + max(1.0, 3 * round_trip_s)
