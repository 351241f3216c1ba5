"""Faults on the worker side: a task that kills its process, a pickled message, a warm
shutdown holding hundreds of delayed calls, and the gate's Redis gone for 20 s.

Every call ends exactly once (a result or a fallback with its reason), none is lost, no
body runs twice, and no window holds more gated admissions than its limit.
"""

from __future__ import annotations

import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import TimeoutError
from celery.result import AsyncResult

from tests.apps.ledger import build
from tests.integration.test_celery_flow import burst, tool
from tests.support.messages import Tripwire, publish_raw
from tests.support.reservations import reservations
from tests.support.servers import private_redis
from tests.support.workers import Cluster, ledger
from throttle import outcome
from throttle.keys import tool_keys
from throttle.task import fallback_reason
from throttle.windows import most_in_window

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def settle(results: list[AsyncResult], timeout_s: float) -> list[str]:
    """Wait for every call: "result", "fallback", or "lost" if it had not ended in time."""
    deadline = time.monotonic() + timeout_s
    kinds = []
    for result in results:
        try:
            result.get(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            kinds.append("lost")
        else:
            kinds.append(outcome(result))
    return kinds


def wait_for_log(cluster: Cluster, needle: str, timeout_s: float) -> bool:
    """Whether `needle` shows up in the workers' logs within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while needle not in cluster.logs():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def queued_messages(broker: redis.Redis, queue: str) -> int:
    """Messages waiting in `queue` (every priority list of kombu's Redis transport)."""
    return sum(broker.llen(name) for name in broker.scan_iter(match=f"{queue}*"))


def test_a_task_that_kills_its_worker_is_parked_after_the_redelivery_cap(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    # When a pool process dies, its node rejects the call with requeue as soon as it
    # notices (task_reject_on_worker_lost): no visibility timeout needs to pass. That takes
    # 0.3-5 s, so each redelivery comes after the first admission left the 100 ms window:
    # the cap must hold whether or not the gate's log still holds that admission.
    cap, poison = 2, 250
    config = {
        "broker": {"visibility_timeout": "30s"},
        "tools": {"work": tool(["100/100ms"], "20s", max_redeliveries=cap)},
    }
    cluster = make_cluster(config, env={"THROTTLE_TEST_POISON": str(poison)})
    cluster.start(2, concurrency=2)
    results, sent = burst(cluster, "work", 501)
    kinds = settle(results, timeout_s=75)
    poisoned = results[poison]
    others = [kind for n, kind in enumerate(kinds) if n != poison]
    attempts = int(redis_client.get(f"{prefix}:poisoned") or 0)
    runs = ledger(redis_client, prefix)
    parked_s = poisoned.date_done.timestamp() - sent[poison] if poisoned.ready() else -1.0
    print(
        f"\npoison task: {kinds[poison]} ({fallback_reason(poisoned)}) after {attempts} runs "
        f"(cap {cap} redeliveries), parked {parked_s:.1f} s after it was sent; "
        f"{others.count('result')}/500 others completed, {others.count('fallback')} fell "
        f"back, {others.count('lost')} lost"
    )
    assert kinds[poison] == "fallback"
    assert fallback_reason(poisoned) == "redelivery_cap"
    assert poisoned.get(timeout=1) == {"n": -1}
    assert attempts == cap + 1  # the first run and `cap` redeliveries, then parked
    assert wait_for_log(cluster, f"task {poisoned.id} was redelivered", 5)
    assert others == ["result"] * 500
    assert len(runs) == 500 and len({run["id"] for run in runs}) == 500
    assert poisoned.id not in {run["id"] for run in runs}
    assert all(proc.poll() is None for proc in cluster.procs)


def test_a_pickled_message_on_a_tool_queue_is_refused_unread_and_the_worker_serves_on(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    tmp_path: Path,
) -> None:
    cluster = make_cluster({"tools": {"guarded": tool(["100/1s"], "10s")}})
    cluster.start(1, concurrency=2)
    app, _, _ = build(cluster.env)
    # The payload is live: unpickling it here creates its file.
    control = tmp_path / "control-unpickled"
    with pickle.loads(pickle.dumps(Tripwire(control))):
        pass
    assert control.exists()

    tripwire = tmp_path / "worker-unpickled"
    task_id = publish_raw(
        app, "tool.guarded", "tool.guarded", {"n": Tripwire(tripwire)}, serializer="pickle"
    )
    refused = wait_for_log(cluster, "Refusing to deserialize untrusted content", 20)
    results, _ = burst(cluster, "guarded", 20)
    kinds = settle(results, timeout_s=30)
    time.sleep(1.0)
    logs = cluster.logs()
    broker = redis.Redis.from_url(redis_dbs[0])
    left = queued_messages(broker, "tool.guarded") + broker.hlen("unacked")
    print(
        f"\npickled message: refused={refused} (ContentDisallowed logged "
        f"{logs.count('ContentDisallowed')}x), unpickled={tripwire.exists()}, state "
        f"{AsyncResult(task_id, app=app).state}, left in broker {left}; worker alive="
        f"{cluster.procs[0].poll() is None}, {kinds.count('result')}/20 later calls served"
    )
    assert refused
    assert "ContentDisallowed" in logs
    assert logs.count(f"refused the message of task '{task_id}'") == 1  # once, not requeued
    assert not tripwire.exists()
    refusal = AsyncResult(task_id, app=app)  # nothing ran; the caller is answered
    assert refusal.state == "FAILURE" and type(refusal.result).__name__ == "InvalidToolCall"
    assert left == 0
    assert task_id not in {run["id"] for run in ledger(redis_client, prefix)}
    assert cluster.procs[0].poll() is None
    assert kinds == ["result"] * 20


def test_a_warm_shutdown_holding_500_delayed_calls_requeues_them_all(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    # 500 calls at 10/1s span 50 s: once the burst has met the gate, most wait for a slot.
    limit, window_s = 10, 1.0
    config = {
        "broker": {"visibility_timeout": "70s"},
        "tools": {"held": tool([f"{limit}/1s"], "60s")},
    }
    cluster = make_cluster(config)
    cluster.start(1, concurrency=2)
    results, _ = burst(cluster, "held", 500)
    keys = tool_keys(prefix, "held")
    # Wait until every call has met the gate: admitted (in the ledger) or holding a slot.
    deadline = time.monotonic() + 30
    while redis_client.llen(f"{prefix}:ledger") + len(reservations(redis_client, keys)) < 500:
        assert time.monotonic() < deadline, "the burst did not reach the gate in 30 s"
        time.sleep(0.05)
    node = cluster.procs[0]
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=30)
    # What the node held when it stopped: the reservations it never admitted (a slot that
    # came due between a count and the signal was admitted and ran; nothing trims the
    # reservations while no node decides).
    held = len(reservations(redis_client, keys))
    ran_before = int(redis_client.llen(f"{prefix}:ledger"))
    broker = redis.Redis.from_url(redis_dbs[0])
    requeued = queued_messages(broker, "tool.held")
    unacked = int(broker.hlen("unacked"))
    cluster.start(1, concurrency=2)
    kinds = settle(results, timeout_s=90)
    runs = ledger(redis_client, prefix)
    ids = [run["id"] for run in runs]
    most = most_in_window([run["admitted_at"] for run in runs], window_s)
    fallbacks = [r for r, kind in zip(results, kinds, strict=True) if kind == "fallback"]
    print(
        f"\nSIGTERM holding {held} delayed calls ({ran_before} had run): {requeued} back on "
        f"the queue after the warm shutdown ({unacked} left unacked); fresh node: "
        f"{kinds.count('result')} results, {len(fallbacks)} fallbacks "
        f"{sorted({str(fallback_reason(r)) for r in fallbacks})}, {kinds.count('lost')} lost, "
        f"bodies run twice: {len(ids) - len(set(ids))}, most admitted in 1 s: {most}/{limit}"
    )
    assert held >= 250  # about 450 on an idle machine
    assert requeued + unacked >= held
    assert kinds.count("lost") == 0
    assert len(ids) == len(set(ids))
    assert set(ids) == {r.id for r, kind in zip(results, kinds, strict=True) if kind == "result"}
    assert {fallback_reason(r) for r in fallbacks} <= {"deadline"}
    assert most <= limit


OUTAGE_S = 20.0
SHORT_DEADLINE_S, LONG_DEADLINE_S = 5.0, 25.0


def test_the_gate_store_down_for_20s_follows_each_tools_policy_and_loses_nothing(
    make_cluster: Any, redis_client: redis.Redis, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # The gate's Redis is a server of its own, stopped for 20 s and started again on the
    # same port (append-only, so windows survive); broker, results and ledger stay up.
    limit = 20
    tools = {
        "fb": tool([f"{limit}/1s"], "40s", on_store_error="fallback"),
        "dl": tool([f"{limit}/1s"], "40s", on_store_error="delay"),
        "ad": tool([f"{limit}/1s"], "40s", on_store_error="admit"),
    }
    with private_redis(tmp_path / "gate", appendonly=True) as gate_server:
        cluster = make_cluster(
            {"broker": {"visibility_timeout": "50s"}, "tools": tools},
            env={"THROTTLE_REDIS_URL": gate_server.url(0), "THROTTLE_TEST_LEDGER_URL": redis_url},
        )
        cluster.start(2, concurrency=2)
        _, _, tasks = build(cluster.env)

        def send(name: str, count: int, **options: Any) -> list[tuple[AsyncResult, float]]:
            return [(tasks[name].apply_async(kwargs={"n": i}, **options), time.time())
                    for i in range(count)]

        before = {name: send(name, 10) for name in tools}
        assert all(settle([r for r, _ in calls], 30) == ["result"] * 10
                   for calls in before.values())

        gate_server.stop()
        down_at = time.time()
        during_fb = send("fb", 20)
        during_ad = send("ad", 2 * limit)
        short_dl = send("dl", 10, deadline_s=SHORT_DEADLINE_S)
        long_dl = send("dl", 10, deadline_s=LONG_DEADLINE_S)
        fb_kinds = settle([r for r, _ in during_fb], 15)
        ad_kinds = settle([r for r, _ in during_ad], 15)
        time.sleep(max(0.0, down_at + OUTAGE_S - time.time()))
        restart_at = time.time()  # the store answers from some time in [restart_at, up_at]
        gate_server.start()
        up_at = time.time()

        after = {name: send(name, 10) for name in tools}
        short_kinds = settle([r for r, _ in short_dl], LONG_DEADLINE_S + 10)
        long_kinds = settle([r for r, _ in long_dl], LONG_DEADLINE_S + 10)
        after_kinds = {name: settle([r for r, _ in calls], 30) for name, calls in after.items()}

    runs = ledger(redis_client, prefix)
    by_id = {run["id"]: run for run in runs}
    fb_waits = sorted(r.date_done.timestamp() - at for r, at in during_fb if r.ready())
    blind = [run for run in runs if run["tool"] == "ad" and down_at <= run["at"] < up_at]
    long_admitted = [by_id[r.id]["at"] - restart_at for r, _ in long_dl if r.id in by_id]
    early = [
        round(r.date_done.timestamp() - at, 1)
        for (r, at), kind in zip(long_dl, long_kinds, strict=True) if kind == "fallback"
    ]
    most_gated = {
        name: most_in_window(
            [run["admitted_at"] for run in runs if run["tool"] == name and run not in blind], 1.0
        )
        for name in tools
    }
    most_blind = most_in_window([run["admitted_at"] for run in blind], 1.0)
    print(
        f"\ngate store down {up_at - down_at:.1f} s:"
        f"\n  fallback: {fb_kinds.count('fallback')}/20 fell back "
        f"{sorted({str(fallback_reason(r)) for r, _ in during_fb})} within "
        f"{fb_waits[-1] if fb_waits else float('nan'):.2f} s (p50 "
        f"{fb_waits[len(fb_waits) // 2] if fb_waits else float('nan'):.2f} s)"
        f"\n  delay: deadline {SHORT_DEADLINE_S:.0f} s -> {short_kinds.count('fallback')}/10 "
        f"fell back; deadline {LONG_DEADLINE_S:.0f} s -> {long_kinds.count('result')}/10 ran "
        f"{min(long_admitted, default=float('nan')):.1f}-"
        f"{max(long_admitted, default=float('nan')):.1f} s after the restart, "
        f"{len(early)} fell back early (at {early} s, store back at {up_at - down_at:.1f} s)"
        f"\n  admit: {ad_kinds.count('result')}/{2 * limit} ran blind, most blind in 1 s: "
        f"{most_blind} (limit {limit}; the gate did not see them)"
        f"\n  after recovery: {sum(k.count('result') for k in after_kinds.values())}/30 results;"
        f" most gated admissions in 1 s: {most_gated}"
    )
    # fallback: every call during the outage fell back at once, none ran: no slower than a
    # call answered before the outage plus one socket timeout (the default 2 s), nowhere
    # near the 40 s max_delay.
    before_waits = [r.date_done.timestamp() - at for calls in before.values() for r, at in calls]
    assert fb_kinds == ["fallback"] * 20
    assert {fallback_reason(r) for r, _ in during_fb} == {"store_unavailable"}
    assert fb_waits[-1] < max(before_waits) + 2.0, (fb_waits[-1], max(before_waits))
    assert not any(r.id in by_id for r, _ in during_fb)
    # delay: the calls whose deadline passed during the outage fell back; the others ran
    # after the store came back (no call is past its deadline when the store returns).
    assert short_kinds == ["fallback"] * 10
    assert {fallback_reason(r) for r, _ in short_dl} == {"store_unavailable"}
    assert not any(r.id in by_id for r, _ in short_dl)
    # A call whose last try (0.5 s before its deadline) came after the store was back ran;
    # the outage is 20 s, longer on a loaded machine, so the 25 s deadline leaves each a try.
    must_run = [up_at + 0.5 < at + LONG_DEADLINE_S - 0.5 for _, at in long_dl]
    assert any(must_run), f"the outage ran {up_at - down_at:.1f} s: the test proved nothing"
    assert all(kind == "result" for kind, must in zip(long_kinds, must_run, strict=True)
               if must), f"fell back before their deadline: {early}"
    assert set(long_kinds) <= {"result", "fallback"}
    assert all(seconds >= 0 for seconds in long_admitted)
    # admit: everything ran, unthrottled; a window may exceed the limit by what ran blind.
    assert ad_kinds == ["result"] * (2 * limit)
    assert len(blind) == 2 * limit
    # Nothing lost, nothing run twice, gated admissions within the limit.
    assert all(kinds == ["result"] * 10 for kinds in after_kinds.values())
    assert len(by_id) == len(runs)
    assert all(most <= limit for most in most_gated.values())
