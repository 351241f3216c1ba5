"""docs/gate.md: the limit holds for bodies that start up to half the slot margin after their
admission. On the real Redis with a pinned clock: a saturated stream of calls (each DELAY
comes back at its slot, a little late), then body start times drawn with every kind of lag
in [0, margin/2] -- no window of the limit ever holds more than `max` starts. And the bound
is tight: one millisecond past margin/2, two starts share a window.
"""

from __future__ import annotations

import heapq
import random

import pytest
import redis

from tests.support.workers import most_in_window
from throttle import Action, Gate, load_config

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
MAX, WINDOW_S, MARGIN_S = 5, 1.0, 0.040
CONFIG = load_config({
    "pools": {"upstream": {"limits": ["1/1s"], "shares": {"standard": 1.0}}},
    "tools": {
        "lagged": {"limits": [f"{MAX}/1s"], "max_delay": "1m", "slot_margin": "40ms"},
        "single": {"limits": ["1/1s"], "max_delay": "1m", "slot_margin": "40ms"},
        "pooled": {"limits": ["100/1s"], "max_delay": "1m", "slot_margin": "40ms",
                   "pool": "upstream", "priority": "standard"},
    },
})


def saturated_admissions(gate: Gate, seed: int) -> list[float]:
    """60 calls over 3 s (4x the limit); each DELAY returns at its slot plus up to
    margin/2 of lateness. The times the gate admitted them, in order."""
    rng = random.Random(seed)
    events = [(P + rng.uniform(0, 3), f"c{n}") for n in range(60)]
    heapq.heapify(events)
    admitted = []
    while events:
        now, member = heapq.heappop(events)
        decision = gate.acquire("lagged", member, now_s=now)
        if decision.action is Action.ADMIT:
            admitted.append(now)
        elif decision.action is Action.DELAY:
            heapq.heappush(events, (decision.slot_at + rng.uniform(0, MARGIN_S / 2), member))
    return sorted(admitted)


def lag_patterns(admitted: list[float], rng: random.Random) -> list[list[float]]:
    """Start lags in [0, margin/2]: none, all, random, and for each admission the pattern
    that pulls every earlier admission as late as allowed into the window it opens."""
    half = MARGIN_S / 2
    patterns = [[0.0] * len(admitted), [half] * len(admitted)]
    patterns += [[rng.uniform(0, half) for _ in admitted] for _ in range(50)]
    patterns += [[half if at < opener else 0.0 for at in admitted] for opener in admitted]
    return patterns


@pytest.mark.parametrize("seed", range(5))
def test_bodies_starting_up_to_half_the_margin_late_never_exceed_the_limit(
    redis_client: redis.Redis, prefix: str, seed: int,
) -> None:
    gate = Gate(redis_client, CONFIG, prefix=prefix)
    admitted = saturated_admissions(gate, seed)
    assert len(admitted) == 60
    assert most_in_window(admitted, WINDOW_S) == MAX  # the limit is binding
    for lags in lag_patterns(admitted, random.Random(seed)):
        starts = [at + lag for at, lag in zip(admitted, lags, strict=True)]
        assert most_in_window(starts, WINDOW_S) <= MAX


@pytest.mark.parametrize("tool", ["single", "pooled"], ids=["tool limit", "pool limit"])
def test_half_the_margin_is_the_exact_bound_on_the_start_lag(
    redis_client: redis.Redis, prefix: str, tool: str,
) -> None:
    """1/1s (the tool's own limit, or its pool's): A admitted at 0; B arriving at W + margin/2
    is admitted at once, a millisecond sooner it is not. A's body (or its request upstream)
    may start margin/2 late and still be a full window before B's; a millisecond more is not."""
    gate = Gate(redis_client, CONFIG, prefix=prefix)
    assert gate.acquire(tool, "A", now_s=P).action is Action.ADMIT
    b_at = P + WINDOW_S + MARGIN_S / 2
    assert gate.acquire(tool, "early", now_s=b_at - 0.001).action is Action.DELAY
    gate.release(tool, "early")  # its reservation, if it got one (a pool hold-back has none)
    assert gate.acquire(tool, "B", now_s=b_at).action is Action.ADMIT
    within, beyond = P + MARGIN_S / 2, P + MARGIN_S / 2 + 0.001
    assert most_in_window([within, b_at], WINDOW_S) == 1
    assert most_in_window([beyond, b_at], WINDOW_S) == 2
