"""acquire.lua's fast path (a new call admitted at once) answers as the general path does.

The fast path is not taken on a log with cost weights: a weight noted for a member that is
not in the log (it never counts) sends a tool's calls down the general path, and its windows
through the weighted walk, with the same decisions. Each test plays one sequence of calls
(pinned clock: new calls, bursts, calls on the windows' edges, reserved calls back early, on
time and late, admitted calls asking again) on a tool and on such a twin, and compares every
answer.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis

from throttle import Gate, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
POOL = {"limits": ["4/1s"], "shares": {"high": 1.0, "low": 0.5}}
TOOLS: dict[str, dict[str, Any]] = {
    "plain": {"limits": ["3/1s", "5/3s"], "max_delay": "10s"},
    "no_margin": {"limits": ["2/500ms"], "max_delay": "5s", "slot_margin": "0ms"},
    "pooled": {"limits": ["3/1s"], "max_delay": "10s", "pool": "p", "priority": "low"},
    "capped": {"limits": ["5/1s"], "max_delay": "10s", "pool": "p", "priority": "high",
               "concurrency": 2, "lease_timeout": "1s"},
    "daily": {"limits": ["3/1s", "60/1d"], "max_delay": "20s"},
}
CONFIG = load_config({
    "pools": {"p": POOL, "q": POOL},
    "tools": {
        **TOOLS,
        **{f"{name}_general": {**tool, **({"pool": "q"} if "pool" in tool else {})}
           for name, tool in TOOLS.items()},
    },
})


def play(gate: Gate, tool: str, seed: int, calls: int = 160) -> list[tuple[Any, ...]]:
    """One seeded sequence of calls on `tool`; every answer, in order."""
    rng = random.Random(seed)
    now = P
    slots: dict[str, float] = {}  # delayed member -> when it was told to come back
    admitted: list[str] = []
    answers: list[tuple[Any, ...]] = []
    for i in range(calls):
        now += rng.choice([0.0, 0.001, 0.1, 0.25, 0.5, 1.0, 1.0, 3.0])
        due = [m for m, at in slots.items() if at <= now + 0.05]
        roll = rng.random()
        if due and roll < 0.5:
            member = min(due, key=slots.__getitem__)
            at = now if rng.random() < 0.7 else slots[member] + rng.choice([-0.01, 0.0, 0.3])
            now = max(now, at)
        elif admitted and roll < 0.6:
            member = rng.choice(admitted)
        else:
            member = f"m{i}"
        decision = gate.acquire(tool, member, now_s=now)
        answers.append((member, decision.action, decision.reason, decision.slot_at,
                        decision.wait_s))
        slots.pop(member, None)
        if decision.action == "delay":
            slots[member] = decision.slot_at
        elif decision.action == "admit":
            admitted.append(member)
            if rng.random() < 0.3 and "capped" in tool:
                gate.finish(tool, member)
    return answers


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_tool_answers_as_its_twin_on_the_general_path(
    redis_client: redis.Redis, prefix: str, tool: str, seed: int
) -> None:
    gate = Gate(redis_client, CONFIG, prefix=prefix)
    twin = CONFIG.tool(f"{tool}_general")
    weights = tool_keys(prefix, twin.name, pool=twin.pool, concurrency=bool(twin.concurrency))
    redis_client.hset(weights.cost, "not-a-call", 2)
    fast = play(gate, tool, seed)
    general = play(gate, twin.name, seed)
    reasons = [answer[2] for answer in fast]
    assert reasons.count("admitted") >= 10  # new calls admitted at once: the fast path
    assert "reserved" in reasons or "pool" in reasons or "concurrency" in reasons
    assert fast == general
