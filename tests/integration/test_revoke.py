"""Revoked calls give back their slot, lease and registry entry, on real workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import states

from tests.apps.ledger import build
from tests.support.rabbit import rabbitmq_queue
from tests.support.reservations import reservations
from tests.support.workers import ledger, most_in_window
from throttle.keys import registry_keys, tool_keys, waiting_key

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

PARAMS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}


def tool(limits: list[str], **extra: Any) -> dict[str, Any]:
    return {"limits": limits, "max_delay": "30s", "params": PARAMS, "result": {"type": "object"},
            "fallback": {"n": -1}, **extra}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `check()` until it is true; returns when it became true (epoch seconds)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.time()


def run_revoke_scenario(cluster: Any, client: redis.Redis, prefix: str, *,
                        by: str = "id") -> None:
    """2/4s: 6 calls (2 admitted, 4 reserved at ~4 s and ~8 s); 1 s later the two reserved
    at ~4 s are revoked (`by` their "id" or their stamped "header"); then 2 new calls take
    their slots. Every call is stamped with its own header `batch`."""
    app, _, tasks = build(cluster.env)
    keys = tool_keys(prefix, "pair")

    def send(n: int) -> Any:
        return tasks["pair"].apply_async(kwargs={"n": n}, stamped_headers=["batch"],
                                         batch=f"b{n}")

    first = [send(n) for n in range(6)]
    sent_at = time.time()
    wait_until(lambda: len(reservations(client, keys)) == 4, 10, "4 reservations")
    earliest = {member.decode() for member in list(reservations(client, keys))[:2]}
    revoked = [n for n, r in enumerate(first) if r.id in earliest]
    time.sleep(max(0.0, sent_at + 1.0 - time.time()))
    revoked_at = time.time()
    if by == "id":
        app.control.revoke([first[n].id for n in revoked])
    else:
        app.control.revoke_by_stamped_headers({"batch": [f"b{n}" for n in revoked]})
    given_back_at = wait_until(
        lambda: not any(first[n].id.encode() in reservations(client, keys) for n in revoked), 5,
        "the slots given back")
    waiting = waiting_key(prefix, "pair", "reserved")
    wait_until(lambda: not any(client.zscore(waiting, first[n].id) for n in revoked), 3,
               "the revoked calls out of the waiting count")
    assert client.zcard(waiting) == 2, "the calls reserved at ~8 s still count as waiting"
    later = [send(6 + i) for i in range(2)]
    kept = [r for n, r in enumerate(first) if n not in revoked] + later
    for result in kept:
        assert result.get(timeout=30)["n"] >= 0
    assert [first[n].state for n in revoked] == [states.REVOKED] * 2

    runs = {run["n"]: run for run in ledger(client, prefix)}
    assert sorted(runs) == [n for n in range(8) if n not in revoked], "revoked calls never ran"
    t0 = min(run["admitted_at"] for run in runs.values())
    at = {n: round(run["admitted_at"] - t0, 2) for n, run in sorted(runs.items())}
    print(f"\nrevoke by {by}: slots given back {given_back_at - revoked_at:.3f}s after the "
          f"revoke; admitted at (s after the first) {at}")
    assert 3.9 <= at[6] < 5.0 and 3.9 <= at[7] < 5.0, "the new calls took the freed ~4 s slots"
    assert sorted(at.values())[-2:] >= [7.9, 7.9], "the other reserved calls kept ~8 s"
    assert most_in_window([run["admitted_at"] for run in runs.values()], 4.0) <= 2
    assert len(reservations(client, keys)) == 0
    calls = registry_keys(prefix, "pair")[0]
    assert all(client.zscore(calls, first[n].id) is None for n in revoked)


def test_revoking_delayed_calls_by_id_frees_their_slots_for_the_next_calls(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    cluster = make_cluster({"tools": {"pair": tool(["2/4s"])}})
    cluster.start(2, concurrency=2)
    run_revoke_scenario(cluster, redis_client, prefix, by="id")


def test_revoking_delayed_calls_by_stamped_header_frees_their_slots_too(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    cluster = make_cluster({"tools": {"pair": tool(["2/4s"])}})
    cluster.start(1, concurrency=2)
    run_revoke_scenario(cluster, redis_client, prefix, by="header")


def test_a_call_revoked_before_it_reaches_the_gate_never_takes_a_slot(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    """1/2s, one worker process busy for 1 s per body: A runs, B is reserved at ~2 s, C
    (revoked while queued) is discarded on arrival, so D gets ~4 s, not ~6 s."""
    cluster = make_cluster({"tools": {"pair": tool(["1/2s"])}},
                           env={"THROTTLE_TEST_BODY_S": "1.0"})
    cluster.start(1, concurrency=1)
    app, throttle, tasks = build(cluster.env)
    calls = registry_keys(prefix, "pair")[0]
    a, b, c, d = (tasks["pair"].delay(n=n) for n in range(4))
    throttle.flush_registrations()  # (sent in the background)
    assert redis_client.zscore(calls, c.id) is not None  # registered by .delay()
    app.control.revoke(c.id)
    for result in (a, b, d):
        result.get(timeout=30)
    wait_until(lambda: c.state == states.REVOKED, 5, "C's REVOKED result")
    runs = {run["n"]: run["admitted_at"] for run in ledger(redis_client, prefix)}
    assert sorted(runs) == [0, 1, 3]
    print(f"\nrevoked before the gate: D admitted {runs[3] - runs[0]:.2f}s after A")
    assert 3.9 <= runs[3] - runs[0] < 5.0
    assert redis_client.zscore(calls, c.id) is None
    assert redis_client.zscore(tool_keys(prefix, "pair").log, c.id) is None


def test_terminating_a_running_call_gives_back_its_lease_at_once(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    """Concurrency 1, bodies of 3 s: A runs, B waits for the lease; revoking A with
    terminate=True (SIGKILL: A's own clean-up cannot run) lets B start at once, not when
    A's lease times out."""
    cluster = make_cluster({"tools": {"capped": tool(["100/1s"], concurrency=1)}},
                           env={"THROTTLE_TEST_BODY_S": "3.0"})
    cluster.start(1, concurrency=2)
    app, _, tasks = build(cluster.env)
    a = tasks["capped"].delay(n=0)
    wait_until(lambda: redis_client.llen(f"{prefix}:ledger") == 1, 10, "A running")
    b = tasks["capped"].delay(n=1)
    time.sleep(0.5)  # B meets the gate and waits for the lease
    assert redis_client.llen(f"{prefix}:ledger") == 1
    revoked_at = time.time()
    app.control.revoke(a.id, terminate=True, signal="SIGKILL")
    assert b.get(timeout=30) == {"n": 1}
    assert a.state == states.REVOKED
    runs = {run["n"]: run for run in ledger(redis_client, prefix)}
    started_after_s = runs[1]["at"] - revoked_at
    print(f"\nterminate: B started {started_after_s:.2f}s after A was revoked")
    assert started_after_s < 1.5, "B waited for A's lease although A was terminated"
    assert not redis_client.hexists(f"{prefix}:ended", a.id), "A's body was killed"
    leases = tool_keys(prefix, "capped", concurrency=True).leases
    assert leases is not None and redis_client.zcard(leases) == 0


@pytest.fixture
def rabbitmq() -> Iterator[str]:
    """RabbitMQ's URL, with the test tool's queue deleted before and after (skip if absent)."""
    with rabbitmq_queue("tool.pair") as url:
        yield url


@pytest.mark.rabbitmq
def test_revoking_delayed_calls_frees_their_slots_with_rabbitmq_as_the_broker(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, rabbitmq: str
) -> None:
    cluster = make_cluster({"tools": {"pair": tool(["2/4s"])}}, broker_url=rabbitmq)
    cluster.start(1, concurrency=2)
    run_revoke_scenario(cluster, redis_client, prefix, by="id")


def test_give_back_frees_a_keyed_reservation_and_shrugs_off_odd_requests(
    redis_url: str, redis_client: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The `task_revoked` receiver alone (no worker): the reservation of the revoked call's
    own key is freed; a request without its key, or with junk arguments, only logs."""
    from types import SimpleNamespace

    from celery import Celery

    from throttle import Throttle, load_config
    from throttle.revocation import give_back

    caplog.set_level(logging.WARNING, logger="throttle")  # whatever an earlier worker set
    app = Celery("revoke-unit", broker="memory://", set_as_current=False)
    config = load_config({"tools": {"keyed": {**tool(["1/10s"]), "key": "n"}}})
    throttle = Throttle(app, config, redis_url, prefix=prefix)

    @throttle.tool
    def keyed(n: int) -> dict[str, int]:
        return {"n": n}

    task = keyed
    gate = throttle.gate
    assert gate.acquire("keyed", "a", key=7).action.value == "admit"
    reserved = gate.acquire("keyed", "b", key=7)
    assert reserved.action.value == "delay"
    keys = tool_keys(prefix, "keyed", 7)
    give_back(sender=task, request=SimpleNamespace(id="b", kwargs={"n": 7}))
    assert len(reservations(redis_client, keys)) == 0
    assert gate.acquire("keyed", "c", key=7).slot_at == reserved.slot_at
    for odd in ({}, "junk", None):
        give_back(sender=task, request=SimpleNamespace(id="c", kwargs=odd))
    assert "not given back" in caplog.text
    give_back(sender=object(), request=SimpleNamespace(id="c", kwargs={}))  # not a tool task
    assert b"c" in reservations(redis_client, keys)
    gate.close()
