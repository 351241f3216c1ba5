"""Shared pools with priority head-room, weighted cost and settle (real Redis, pinned clock)."""

from __future__ import annotations

import heapq
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import delete_prefix
from throttle import Action, Gate, load_config
from throttle.windows import most_in_window

pytestmark = pytest.mark.redis

T0 = 1_000_000.0


def pool_config(pool_limits: list[str], **tools: dict[str, Any]) -> Any:
    shares = {"critical": 1.0, "standard": 0.8, "expensive": 0.5}
    return load_config({
        "broker": {"visibility_timeout": "2h"},
        "pools": {"upstream": {"limits": pool_limits, "shares": shares}},
        "tools": {
            name: {"max_delay": "1h", "slot_margin": "0ms", "pool": "upstream", **body}
            for name, body in tools.items()
        },
    })


def test_critical_calls_keep_their_headroom_while_an_expensive_tool_floods_the_pool(
    redis_client: redis.Redis, prefix: str
) -> None:
    config = pool_config(
        ["100/2s"],
        critical={"limits": ["100000/1s"], "priority": "critical"},
        expensive={"limits": ["100000/1s"], "priority": "expensive"},
    )
    gate = Gate(redis_client, config, prefix=prefix)
    # 10 s: the expensive tool offers 10x the pool's rate (its delayed calls are offered
    # again at their wait), the critical one a steady 30 per 2 s.
    events = [(T0 + i * 0.004, "expensive", f"e{i}") for i in range(2500)]
    events += [(T0 + i * (2 / 30), "critical", f"c{i}") for i in range(150)]
    heapq.heapify(events)
    retried: set[str] = set()
    admitted: dict[str, list[float]] = {"critical": [], "expensive": []}
    critical_waits = []
    while events:
        now, tool, member = heapq.heappop(events)
        decision = gate.acquire(tool, member, now_s=now)
        if decision.action is Action.ADMIT:
            admitted[tool].append(decision.slot_at)
        elif decision.action is Action.DELAY:
            if tool == "critical":
                critical_waits.append(decision)
            elif member not in retried:
                retried.add(member)
                heapq.heappush(events, (now + decision.wait_s, tool, member))
    everything = admitted["critical"] + admitted["expensive"]
    print(
        f"\npool 100/2s: critical admitted {len(admitted['critical'])}/150, delayed "
        f"{len(critical_waits)}; expensive most in 2 s {most_in_window(admitted['expensive'], 2)}"
        f"; pool most in 2 s {most_in_window(everything, 2)}"
    )
    assert critical_waits == []
    assert len(admitted["critical"]) == 150
    assert most_in_window(admitted["expensive"], 2.0) <= 50
    assert most_in_window(everything, 2.0) <= 100
    # The share bounds the whole pool's use when an expensive call is admitted: beside the
    # critical tool's 30 per window, the expensive one fills the pool up to 50, not beyond.
    assert len(admitted["expensive"]) >= 5 * (50 - 30)
    assert most_in_window(everything, 2.0) >= 50


def test_a_class_uses_idle_capacity_up_to_its_share_and_never_beyond(
    redis_client: redis.Redis, prefix: str
) -> None:
    config = pool_config(["10/60s"], cheap={"limits": ["100/1s"], "priority": "standard"})
    gate = Gate(redis_client, config, prefix=prefix)
    actions = [gate.acquire("cheap", f"m{i}", now_s=T0).action for i in range(10)]
    assert actions.count(Action.ADMIT) == 8  # 0.8 x 10
    blocked = gate.acquire("cheap", "late", now_s=T0 + 1)
    assert (blocked.action, blocked.reason) == (Action.DELAY, "pool")
    assert blocked.slot_at == pytest.approx(T0 + 60)


def test_a_call_whose_pool_wait_passes_its_deadline_falls_back(
    redis_client: redis.Redis, prefix: str
) -> None:
    config = pool_config(["1/60s"], t={"limits": ["100/1s"], "priority": "critical"})
    gate = Gate(redis_client, config, prefix=prefix)
    assert gate.acquire("t", "a", now_s=T0).action is Action.ADMIT
    refused = gate.acquire("t", "b", now_s=T0, deadline_s=10)
    assert (refused.action, refused.reason) == (Action.FALLBACK, "deadline")


def test_settle_moves_the_charge_up_and_down_and_later_admissions_see_it(
    redis_client: redis.Redis, prefix: str
) -> None:
    config = pool_config(["20/60s"], llm={"limits": ["10/60s"], "priority": "critical"})
    gate = Gate(redis_client, config, prefix=prefix)
    assert gate.acquire("llm", "a", cost=5, now_s=T0).action is Action.ADMIT
    assert gate.acquire("llm", "b", cost=5, now_s=T0).action is Action.ADMIT
    assert gate.acquire("llm", "c", cost=3, now_s=T0 + 1).action is Action.DELAY
    assert gate.release("llm", "c")
    assert gate.settle("llm", "a", 2)  # 2 + 5 = 7 used: 3 more fit
    assert gate.acquire("llm", "d", cost=3, now_s=T0 + 2).action is Action.ADMIT
    assert gate.acquire("llm", "e", cost=1, now_s=T0 + 3).action is Action.DELAY
    assert gate.release("llm", "e")
    assert gate.settle("llm", "b", 1)  # 2 + 1 + 3 = 6 used
    assert gate.acquire("llm", "f", cost=4, now_s=T0 + 4).action is Action.ADMIT
    assert gate.settle("llm", "f", 9)  # upward: 2 + 1 + 3 + 9 = 15 > 10
    late = gate.acquire("llm", "g", cost=1, now_s=T0 + 5)
    assert late.action is Action.DELAY
    # 15 units in the window: 6 must leave for one more (a 2, b 1, d 3): d's time + 60 s.
    assert late.slot_at == pytest.approx(T0 + 62)
    assert not gate.settle("llm", "gone", 3)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pool_max=st.integers(5, 30),
    share=st.sampled_from([0.5, 0.8, 1.0]),
    calls=st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(1, 5), st.integers(0, 3)),
        min_size=1, max_size=60,
    ),
)
def test_weighted_admissions_never_exceed_the_pool_or_a_class_share(
    redis_client: redis.Redis, prefix: str, pool_max: int, share: float, calls: list[Any]
) -> None:
    config = load_config({
        "broker": {"visibility_timeout": "2h"},
        "pools": {"p": {"limits": [f"{pool_max}/10s"], "shares": {"a": 1.0, "b": share}}},
        "tools": {
            "hi": {"limits": ["1000/1s"], "max_delay": "1h", "pool": "p", "priority": "a"},
            "lo": {"limits": ["1000/1s"], "max_delay": "1h", "pool": "p", "priority": "b"},
        },
    })
    gate = Gate(redis_client, config, prefix=f"{prefix}-h")
    allowance = {"hi": pool_max, "lo": share * pool_max}
    now = T0
    admissions: list[tuple[float, str, int, float]] = []  # time, tool, units, final charge
    try:
        for i, (gap_s, units, actual) in enumerate(calls):
            now += gap_s
            tool = "hi" if i % 3 == 0 else "lo"
            decision = gate.acquire(tool, f"m{i}", cost=units, now_s=now)
            if decision.action is Action.ADMIT:
                if actual:  # some calls settle to their "real" cost right away
                    assert gate.settle(tool, f"m{i}", actual)
                admissions.append((now, tool, units, actual or units))
            elif decision.action is Action.DELAY:
                assert decision.reason == "pool"
        # Every admission fitted its class's allowance, counting the corrected charges of
        # the admissions before it in the window.
        for k, (at, tool, units, _) in enumerate(admissions):
            used = sum(charge for t, _, _, charge in admissions[:k] if t > at - 10)
            assert used + units <= allowance[tool] + 1e-9
    finally:
        delete_prefix(redis_client, f"{prefix}-h")


def test_a_new_call_past_its_deadline_falls_back_even_when_capacity_is_free(
    redis_client: redis.Redis, prefix: str
) -> None:
    """A call the pool held back comes back as a new call; if its time is up, it falls back."""
    config = pool_config(["10/60s"], t={"limits": ["100/1s"], "priority": "critical"})
    gate = Gate(redis_client, config, prefix=prefix)
    late = gate.acquire("t", "late", deadline_s=-0.2, now_s=T0)
    assert (late.action, late.reason) == (Action.FALLBACK, "deadline")
    assert gate.acquire("t", "on-time", deadline_s=0.0, now_s=T0).action is Action.ADMIT
