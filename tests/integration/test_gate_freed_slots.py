"""Slots given back by released reservations (revoked calls) go to the next new calls, and
never break a window. The clock is pinned (`now_s`)."""

from __future__ import annotations

import heapq
import random
import uuid

import pytest
import redis

from tests.support.workers import most_in_window
from throttle import Action, Gate, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
CONFIG = load_config({
    "defaults": {"slot_margin": "0ms"},
    "tools": {
        "pair": {"limits": ["2/4s"], "max_delay": "60s"},
        "mixed": {"limits": ["3/2s", "5/10s"], "max_delay": "60s", "slot_margin": "20ms"},
    },
})


@pytest.fixture
def gate(redis_client: redis.Redis, prefix: str) -> Gate:
    return Gate(redis_client, CONFIG, prefix=prefix)


def test_a_released_slot_goes_to_the_next_new_call_instead_of_staying_idle(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    first = [gate.acquire("pair", m, now_s=P) for m in "ABCDEF"]
    assert [d.slot_at - P for d in first] == [0, 0, 4, 4, 8, 8]
    assert gate.release("pair", "C") and gate.release("pair", "D")
    # FIFO alone would place new calls after the latest reservation (E, F at 8 s): at 12 s.
    late = [gate.acquire("pair", m, now_s=P + 1) for m in "GHI"]
    assert [(d.action, d.reason, d.slot_at - P) for d in late] == [
        (Action.DELAY, "reserved", 4), (Action.DELAY, "reserved", 4),
        (Action.DELAY, "reserved", 12),
    ]
    assert redis_client.zcard(tool_keys(prefix, "pair").free) == 0
    due = gate.acquire("pair", "G", now_s=P + 4)
    assert (due.action, due.reason) == (Action.ADMIT, "reservation")


def test_a_released_slot_whose_units_were_placed_again_is_not_handed_out_twice(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    assert [gate.acquire("pair", m, now_s=P).slot_at - P for m in "ABCD"] == [0, 0, 4, 4]
    assert gate.release("pair", "C")
    # E's own slot is C's (the window at 4 s has room again): taken the ordinary way.
    assert gate.acquire("pair", "E", now_s=P + 1).slot_at == P + 4
    # The freed entry is still listed, but the window at 4 s is full (D, E): F waits to 8 s.
    assert redis_client.zcard(tool_keys(prefix, "pair").free) == 1
    assert gate.acquire("pair", "F", now_s=P + 1).slot_at == P + 8


def test_random_releases_never_break_a_window_and_freed_slots_are_reused(gate: Gate) -> None:
    """Arrivals, releases of random reservations and due calls, replayed in time order."""
    rng = random.Random(21)
    events: list[tuple[float, int, str, str]] = []  # (time, order, kind, member)
    order = 0

    def push(at: float, kind: str, member: str) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, member))

    at = P
    for _ in range(300):
        at += rng.expovariate(2.0)
        push(at, "arrive", uuid.uuid4().hex[:8])
    admitted: list[float] = []
    gone: set[str] = set()
    latest_reserved, reused, released = P, 0, 0
    while events:
        now, _, kind, member = heapq.heappop(events)
        if kind == "release":
            if gate.release("mixed", member):
                released += 1
                gone.add(member)
            continue
        if member in gone:  # a revoked call never comes back
            continue
        decision = gate.acquire("mixed", member, now_s=now)
        if decision.action is Action.ADMIT:
            admitted.append(decision.slot_at)
        elif decision.action is Action.DELAY:
            if kind == "arrive" and decision.slot_at < latest_reserved - 1e-6:
                reused += 1
            latest_reserved = max(latest_reserved, decision.slot_at)
            push(decision.slot_at, "due", member)
            if kind == "arrive" and rng.random() < 0.2:
                push(now + rng.uniform(0, decision.wait_s), "release", member)
    assert most_in_window(admitted, 2.0) <= 3
    assert most_in_window(admitted, 10.0) <= 5
    assert released > 20 and reused > 5, (released, reused)
