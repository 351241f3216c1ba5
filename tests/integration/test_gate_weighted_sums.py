"""The sum of a weighted log's units (throttle/lua/units.lua) stays exact.

Once a window of a weighted log holds more than 32 entries, its cost hash keeps, under the
field '', the sum of the log's units, from which acquire.lua reads a wide window's use.
Seeded random operations (acquire, release, settle, cooldown, time passing) run on a lone
tool and on a tool in a pool, with whole and fractional costs; after each one every kept sum
equals the units of its log's entries. (Decisions read from the sum are checked against the
documented rule by test_gate_properties.py's wide windows.)
"""

from __future__ import annotations

import random

import pytest
import redis

from throttle import Gate, load_config
from throttle.keys import keys_for

pytestmark = pytest.mark.redis

BASE_S = 1_700_000_000.0
CONFIG = {
    "broker": {"visibility_timeout": "1h"},
    "pools": {"api": {"limits": ["150/10s"], "shares": {"standard": 1.0}}},
    "tools": {
        "lone": {"limits": ["100/10s"], "max_delay": "30s"},
        "pooled": {"limits": ["1000/1s"], "max_delay": "30s", "pool": "api",
                   "priority": "standard"},
    },
}
KINDS = ["acquire"] * 10 + ["release"] * 3 + ["settle"] * 3 + ["cooldown"]


def logs_of(gate: Gate) -> list[tuple[str, str]]:
    """Every (log, cost hash) pair the two tools write."""
    lone = keys_for(gate.prefix, gate.config.tools["lone"], None)
    pooled = keys_for(gate.prefix, gate.config.tools["pooled"], None)
    assert pooled.pool_log and pooled.pool_cost
    return [(lone.log, lone.cost), (pooled.log, pooled.cost), (pooled.pool_log, pooled.pool_cost)]


def kept_sum(client: redis.Redis, cost: str) -> tuple[float, int, float] | None:
    """The sum a cost hash keeps: (units, entries, built at ms), or None."""
    text = client.hget(cost, "")
    if text is None:
        return None
    units, entries, built = text.split()
    return float(units), int(entries), float(built)


def sums_checked(client: redis.Redis, logs: list[tuple[str, str]]) -> int:
    """How many logs keep a sum; each one must equal its log's units and entries."""
    kept = 0
    for log, cost in logs:
        units = client.hgetall(cost)
        sum_kept = kept_sum(client, cost)
        if sum_kept is not None:
            kept += 1
            entries = client.zrange(log, 0, -1)
            expected = sum(float(units.get(member, 1)) for member in entries)
            assert sum_kept[0] == pytest.approx(expected, abs=1e-9), (log, units, entries)
            assert sum_kept[1] == len(entries), (log, sum_kept, entries)
    return kept


@pytest.mark.parametrize("fractions", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_every_script_keeps_a_weighted_logs_sum_exact(
    redis_client: redis.Redis, prefix: str, seed: int, fractions: bool
) -> None:
    client = redis_client
    rng = random.Random(seed)
    costs = [1, 1, 1, 2, 3, 7] + ([0.5, 2.25] if fractions else [])
    gate = Gate(client, load_config(CONFIG), prefix=prefix)
    logs = logs_of(gate)
    now, kept = BASE_S, 0
    for tool in ("lone", "pooled"):  # a burst of 40 weighted calls: each log keeps a sum
        for index in range(40):
            gate.acquire(tool, f"{tool}-burst-{index}", cost=3, deadline_s=30, now_s=now)
    assert sums_checked(client, logs) == 3
    for _ in range(1000):
        now += rng.uniform(0, 12) if rng.random() < 0.004 else rng.uniform(0, 0.01)
        tool = rng.choice(["lone", "pooled"])
        member = f"{tool}-{rng.randrange(100)}"
        kind = rng.choice(KINDS)
        if kind == "acquire":
            gate.acquire(tool, member, cost=rng.choice(costs), deadline_s=30, now_s=now)
        elif kind == "release":
            gate.release(tool, member)
        elif kind == "settle":
            gate.settle(tool, member, rng.choice([0, *costs]))
        else:
            gate.cool_down(tool, 0.03, member=member, now_s=now)
        kept += sums_checked(client, logs)
    assert kept > 300, "the sums did not last"


def test_a_sum_a_writer_did_not_keep_is_built_again_before_it_is_read(
    redis_client: redis.Redis, prefix: str
) -> None:
    """A worker of an older version admits without keeping the sum; a worker of this one
    then builds it again (its count is not the log's), and the limit holds exactly. A sum
    whose units drifted but whose count did not is built again once a window has passed."""
    client = redis_client
    gate = Gate(client, load_config(CONFIG), prefix=prefix)
    lone = keys_for(prefix, gate.config.tools["lone"], None)
    now = BASE_S
    for index in range(40):  # 80 of 100 units in the window: the log keeps a sum
        gate.acquire("lone", f"c{index}", cost=2, deadline_s=30, now_s=now)
    assert kept_sum(client, lone.cost) is not None
    client.zadd(lone.log, {"old-worker": now * 1000})  # admitted as an older version does
    client.hset(lone.cost, "old-worker", 15)
    assert gate.acquire("lone", "next", cost=6, deadline_s=30, now_s=now).action.value \
        == "delay"  # 95 + 6 > 100: with the stale sum (80) it would have been admitted
    assert sums_checked(client, logs_of(gate)) >= 1
    units, entries, built = kept_sum(client, lone.cost) or (0.0, 0, 0.0)
    client.hset(lone.cost, "", f"{units - 50} {entries} {built}")  # units off, count right
    later = now + 10.5  # a window on: 60 more calls of 2 units, the window holds 50
    answers = [gate.acquire("lone", f"n{index}", cost=2, deadline_s=30, now_s=later)
               for index in range(60)]
    assert sum(answer.reason == "admitted" for answer in answers) < 50
    costs = client.hgetall(lone.cost)
    window = [float(costs.get(member, 1)) for member, score in
              client.zrange(lone.log, 0, -1, withscores=True)
              if (later - 10.02) * 1000 < score <= later * 1000]
    assert sum(window) <= 100, window  # with the drifted sum it would hold 150
    assert sums_checked(client, logs_of(gate)) == 1
