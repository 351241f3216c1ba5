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
import uuid
from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def logs_of(gate: Gate) -> list[tuple[str, str]]:
    """Every (log, cost hash) pair the two tools write."""
    lone = keys_for(gate.prefix, gate.config.tools["lone"], None)
    pooled = keys_for(gate.prefix, gate.config.tools["pooled"], None)
    assert pooled.pool_log and pooled.pool_cost
    return [(lone.log, lone.cost), (pooled.log, pooled.cost), (pooled.pool_log, pooled.pool_cost)]


def sums_checked(client: redis.Redis, logs: list[tuple[str, str]]) -> int:
    """How many logs keep a sum; each one must equal its log's units."""
    kept = 0
    for log, cost in logs:
        units = client.hgetall(cost)
        if b"" in units:
            kept += 1
            entries = client.zrange(log, 0, -1)
            expected = sum(float(units.get(member, 1)) for member in entries)
            assert float(units[b""]) == pytest.approx(expected, abs=1e-9), (log, units, entries)
    return kept


@pytest.mark.parametrize("fractions", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_every_script_keeps_a_weighted_logs_sum_exact(
    client: redis.Redis, seed: int, fractions: bool
) -> None:
    rng = random.Random(seed)
    costs = [1, 1, 1, 2, 3, 7] + ([0.5, 2.25] if fractions else [])
    prefix = f"throttle-test-{uuid.uuid4().hex[:12]}"
    gate = Gate(client, load_config(CONFIG), prefix=prefix)
    logs = logs_of(gate)
    now, kept = BASE_S, 0
    try:
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
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
