"""Pool waits reserve a slot: a call the pool holds back comes back about once (real Redis)."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from typing import Any

import pytest
import redis

from throttle import Action, Gate, load_config
from throttle.windows import most_in_window

pytestmark = pytest.mark.redis

T0 = 1_000_000.0


def config(margin: str) -> Any:
    return load_config({
        "broker": {"visibility_timeout": "2h"},
        "pools": {"api": {"limits": ["10/2s"],
                          "shares": {"critical": 1.0, "standard": 0.8}}},
        "tools": {
            "cheap": {"limits": ["1000/1s"], "max_delay": "1h", "pool": "api",
                      "priority": "standard", "slot_margin": margin},
            "vital": {"limits": ["1000/1s"], "max_delay": "1h", "pool": "api",
                      "priority": "critical", "slot_margin": margin},
        },
    })


@pytest.mark.parametrize(("margin", "late_s"), [("0ms", 0.0), ("40ms", 0.02)])
def test_calls_the_pool_holds_back_are_delivered_about_once_and_critical_keeps_its_headroom(
    redis_client: redis.Redis, prefix: str, margin: str, late_s: float
) -> None:
    """120 cheap calls at once, 1 vital call per second: each cheap call comes back at its
    wait (up to half the slot margin late); the pool's windows stay exact, vital calls
    never wait, and a held call is re-delivered about once."""
    gate = Gate(redis_client, config(margin), prefix=prefix)
    jitter = random.Random(16)
    events = [(T0 + i * 1e-4, "cheap", f"c{i}") for i in range(120)]
    events += [(T0 + 0.5 + i, "vital", f"v{i}") for i in range(30)]
    heapq.heapify(events)
    deliveries: Counter[str] = Counter()
    admitted: dict[str, list[float]] = {"cheap": [], "vital": []}
    vital_waits = []
    while events:
        now, tool, member = heapq.heappop(events)
        deliveries[member] += 1
        assert deliveries[member] <= 20, f"{member} re-polls the pool"
        decision = gate.acquire(tool, member, now_s=now)
        if decision.action is Action.ADMIT:
            admitted[tool].append(decision.slot_at)
        elif decision.action is Action.DELAY:
            if tool == "vital":
                vital_waits.append(decision)
            heapq.heappush(events, (now + decision.wait_s + jitter.uniform(0, late_s), tool,
                                    member))
        else:
            pytest.fail(f"{member} fell back: {decision.reason}")
    cheap = [deliveries[f"c{i}"] for i in range(120)]
    everything = admitted["cheap"] + admitted["vital"]
    print(f"\npool 10/2s (cheap 8, margin {margin}): {sum(cheap)} cheap deliveries for 120 "
          f"calls, most {max(cheap)}; pool most in 2 s {most_in_window(everything, 2)}, "
          f"cheap {most_in_window(admitted['cheap'], 2)}; vital delayed {len(vital_waits)}")
    assert len(admitted["cheap"]) == 120 and len(admitted["vital"]) == 30
    assert vital_waits == []
    assert most_in_window(everything, 2.0) <= 10
    assert most_in_window(admitted["cheap"], 2.0) <= 8
    # About once: 8 run at once, the other 112 are re-delivered once each; each vital call
    # that takes head-room at admission may send one reserved cheap call round once more.
    assert sum(cheap) <= 8 + 2 * 112 + 30
    assert max(cheap) <= 4
