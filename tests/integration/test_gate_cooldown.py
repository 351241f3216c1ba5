"""Cooldowns (the upstream asked for a pause): nothing is admitted until they end, on any
gate; queued calls come back after, or fall back when the pause outlasts their deadline."""

from __future__ import annotations

import pytest
import redis

from tests.support.reservations import reservations
from throttle import Action, Gate, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

P = 1_700_000_000.0  # a pinned "now", in epoch seconds
CONFIG = load_config({
    "defaults": {"slot_margin": "0ms"},
    "pools": {"upstream": {"limits": ["100/60s"], "shares": {"critical": 1.0}}},
    "tools": {
        "chat": {"limits": ["2/10s"], "max_delay": "30s"},
        "pooled_a": {"limits": ["10/1s"], "max_delay": "5s", "pool": "upstream",
                     "priority": "critical", "concurrency": 2},
        "pooled_b": {"limits": ["10/1s"], "max_delay": "5s", "pool": "upstream",
                     "priority": "critical"},
    },
})


@pytest.fixture
def gate(redis_client: redis.Redis, prefix: str) -> Gate:
    return Gate(redis_client, CONFIG, prefix=prefix)


def test_a_cooldown_delays_new_calls_past_its_end_without_reserving(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    assert gate.cool_down("chat", 3, now_s=P) == pytest.approx(P + 3)
    decision = gate.acquire("chat", "a", now_s=P + 1)
    assert (decision.action, decision.reason) == (Action.DELAY, "cooldown")
    assert decision.wait_s == pytest.approx(2)
    assert redis_client.zcard(tool_keys(prefix, "chat").log) == 0
    # After it: admitted, and reserved as usual.
    assert gate.acquire("chat", "a", now_s=P + 3).action is Action.ADMIT
    assert gate.acquire("chat", "b", now_s=P + 3).action is Action.ADMIT
    assert gate.acquire("chat", "c", now_s=P + 3).reason == "reserved"


def test_a_cooldown_longer_than_the_deadline_falls_back_at_once(gate: Gate) -> None:
    gate.cool_down("chat", 40, now_s=P)
    decision = gate.acquire("chat", "a", now_s=P)
    assert (decision.action, decision.reason) == (Action.FALLBACK, "cooldown")
    assert gate.acquire("chat", "b", now_s=P, deadline_s=1).action is Action.FALLBACK
    assert gate.acquire("chat", "c", now_s=P + 15).action is Action.DELAY  # 25 s left < 30


def test_a_reservation_inside_the_cooldown_is_given_back_and_told_to_come_back_after(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    for member in "ab":
        assert gate.acquire("chat", member, now_s=P).action is Action.ADMIT
    assert gate.acquire("chat", "c", now_s=P).slot_at == pytest.approx(P + 10)
    gate.cool_down("chat", 12, now_s=P + 1)
    decision = gate.acquire("chat", "c", now_s=P + 10)
    assert (decision.action, decision.reason) == (Action.DELAY, "cooldown")
    assert decision.slot_at == pytest.approx(P + 13)
    assert len(reservations(redis_client, tool_keys(prefix, "chat"))) == 0
    assert gate.acquire("chat", "c", now_s=P + 13).action is Action.ADMIT


def test_a_cooldown_only_grows_and_cooldown_left_reads_it(gate: Gate) -> None:
    gate.cool_down("chat", 5)
    gate.cool_down("chat", 1)
    assert 4 < gate.cooldown_left("chat") <= 5
    assert gate.cooldown_left("pooled_a") == 0
    with pytest.raises(ValueError, match="more than 0 s"):
        gate.cool_down("chat", 0)


def test_a_pooled_tools_cooldown_pauses_its_pool_and_frees_the_refused_calls_units(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    assert gate.acquire("pooled_a", "x", now_s=P).action is Action.ADMIT
    keys = tool_keys(prefix, "pooled_a", pool="upstream", concurrency=True)
    assert redis_client.zscore(keys.leases, "x") is not None
    gate.cool_down("pooled_a", 2, member="x", now_s=P + 0.5)
    # The refused call left the tool's log, the pool's log and its lease.
    assert redis_client.zscore(keys.log, "x") is None
    assert redis_client.zscore(keys.pool_log or "", "x") is None
    assert redis_client.zscore(keys.leases or "", "x") is None
    # Every tool of the pool waits it out.
    decision = gate.acquire("pooled_b", "y", now_s=P + 1)
    assert (decision.action, decision.reason) == (Action.DELAY, "cooldown")
    assert decision.wait_s == pytest.approx(1.5)
    assert gate.acquire("pooled_b", "y", now_s=P + 2.5).action is Action.ADMIT
