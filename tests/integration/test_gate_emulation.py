"""The same Lua on the in-process Redis emulation (fakeredis with Lua).

This is the emulation the embedded demo runs when no Redis URL is set: these tests prove the
gate's scripts behave there exactly as on the real Redis (no Python twin of the algorithm).
A fake is used on purpose here; everything else runs on the real Redis. The tools set
`slot_margin = "0ms"` for round numbers; the last test replays a scenario with the default
margin on both the emulation and the real Redis and compares every answer.
"""

from __future__ import annotations

import fakeredis
import pytest
import redis

from throttle import Action, Decision, Gate, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.emulation

P = 1_700_000_000.0
CONFIG = load_config(
    {
        "broker": {"visibility_timeout": "2h"},
        "defaults": {"slot_margin": "0ms"},
        "tools": {
            "one": {"limits": ["1/60s"], "max_delay": "10m"},
            "burst": {"limits": ["5/60s"], "max_delay": "1h"},
            "weighted": {"limits": ["10/60s"], "max_delay": "10m"},
            "mixed": {"limits": ["2/1s", "5/10s"], "max_delay": "1m", "slot_margin": "10ms"},
            "paced": {"limits": ["4/2s"], "max_delay": "1m", "pace": "even", "slot_margin": "5ms"},
        },
    }
)


@pytest.fixture
def server() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def gate(server: fakeredis.FakeRedis) -> Gate:
    return Gate(server, CONFIG, prefix="throttle-emulated")


def test_one_slot_per_member_and_release_behave_as_on_redis(
    gate: Gate, server: fakeredis.FakeRedis
) -> None:
    """The exactness scenario of test_gate_semantics, on the emulation."""
    a = gate.acquire("one", "A", now_s=P)
    assert (a.action, a.reason, a.slot_at) == (Action.ADMIT, "admitted", P)
    assert gate.acquire("one", "A", now_s=P + 1).reason == "readmitted"
    b = gate.acquire("one", "B", now_s=P)
    assert (b.action, b.reason, b.slot_at, b.wait_s) == (Action.DELAY, "reserved", P + 60, 60)
    assert gate.acquire("one", "B", now_s=P + 30).reason == "early"

    assert gate.release("one", "B") is True
    c = gate.acquire("one", "C", now_s=P + 1)
    assert (c.action, c.slot_at) == (Action.DELAY, P + 60)
    assert gate.release("one", "A") is False
    due = gate.acquire("one", "C", now_s=P + 60)
    assert (due.action, due.reason) == (Action.ADMIT, "reservation")
    log = server.zrange(tool_keys("throttle-emulated", "one").log, 0, -1, withscores=True)
    assert log == [(b"C", (P + 60) * 1000)], "A left the log with its window"


def test_a_burst_admits_5_and_reserves_the_rest_one_window_per_group(gate: Gate) -> None:
    """A single-process, pinned-clock version of the 200-call exactness test."""
    decisions = [gate.acquire("burst", f"call-{n}", now_s=P) for n in range(50)]
    assert [d.action for d in decisions].count(Action.ADMIT) == 5
    slots = sorted(d.slot_at for d in decisions)
    assert slots == [P + 60 * (n // 5) for n in range(50)]
    for i in range(len(slots) - 5):
        assert slots[i + 5] - slots[i] >= 60


def test_weighted_costs_and_deadlines_behave_as_on_redis(gate: Gate) -> None:
    assert gate.acquire("weighted", "A", cost=10, now_s=P).action is Action.ADMIT
    assert gate.acquire("weighted", "B", cost=4, now_s=P).slot_at == P + 60
    assert gate.acquire("weighted", "C", cost=11, now_s=P).reason == "cost_exceeds_limit"
    assert gate.acquire("weighted", "D", cost=1, deadline_s=30, now_s=P).reason == "deadline"


def test_the_emulation_clock_drives_the_gate_when_none_is_pinned(gate: Gate) -> None:
    first = gate.acquire("one", "A")
    second = gate.acquire("one", "B")
    assert first.action is Action.ADMIT
    assert second.action is Action.DELAY
    assert second.slot_at == pytest.approx(first.slot_at + 60, abs=1e-3)


def replay(gate: Gate) -> list[Decision | bool]:
    """A scenario through every path: admit, reserve, early, due, late, release, fallback."""
    answers: list[Decision | bool] = []
    returns: list[tuple[float, int, str, str, int]] = []
    for n in range(12):
        for tool in ("mixed", "paced"):
            member, cost = f"{tool}-{n}", (1 + n % 2 if tool == "mixed" else 1)
            decision = gate.acquire(tool, member, cost=cost, now_s=P + n * 0.25)
            answers.append(decision)
            if decision.action is Action.DELAY:
                lateness = 0.3 if n % 3 == 0 else 0.0
                returns.append((decision.slot_at - 0.1, len(returns), tool, member, cost))
                returns.append((decision.slot_at + lateness, len(returns), tool, member, cost))
    answers.append(gate.release("mixed", "mixed-11"))
    answers.append(gate.acquire("mixed", "mixed-0", now_s=P + 3))
    answers.append(gate.acquire("mixed", "hurried", deadline_s=0.5, now_s=P + 3))
    answers.append(gate.acquire("mixed", "heavy", cost=3, now_s=P + 3))
    for at, _, tool, member, cost in sorted(returns):
        answers.append(gate.acquire(tool, member, cost=cost, now_s=at))
    return answers


@pytest.mark.redis
def test_the_emulation_decides_exactly_as_the_real_redis(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    emulated = replay(gate)
    real = replay(Gate(redis_client, CONFIG, prefix=prefix))
    assert emulated == real
    reasons = {answer.reason for answer in real if isinstance(answer, Decision)}
    expected = {"admitted", "reserved", "reservation", "early", "late", "readmitted", "deadline"}
    assert expected | {"cost_exceeds_limit"} <= reasons
