"""The sum of a weighted log's units (throttle/lua/units.lua) stays exact.

A weighted tool's cost hash keeps, under the field '', the sum of its log's units, from which
acquire.lua reads a wide window's use. Random operations (acquire, release, settle, cooldown,
time passing) run on a lone tool and on a tool in a pool, with whole and fractional costs;
after each one every kept sum equals the units of its log's entries, and after an acquire a
hash that gives costs keeps a sum. (Decisions read from the sum are checked against the
documented rule by test_gate_properties.py's wide windows.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from throttle import Gate, load_config
from throttle.keys import keys_for

pytestmark = pytest.mark.redis

BASE_S = 1_700_000_000.0
CONFIG = {
    "broker": {"visibility_timeout": "1h"},
    "pools": {"api": {"limits": ["80/10s"], "shares": {"standard": 1.0}}},
    "tools": {
        "lone": {"limits": ["60/10s"], "max_delay": "30s"},
        "pooled": {"limits": ["1000/1s"], "max_delay": "30s", "pool": "api",
                   "priority": "standard"},
    },
}


@dataclass(frozen=True)
class Op:
    kind: str
    tool: str
    member: int
    number: float
    after_ms: int


ops = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(["acquire"] * 6 + ["release", "settle", "settle", "cooldown"]),
        tool=st.sampled_from(["lone", "pooled"]),
        member=st.integers(0, 9),
        number=st.sampled_from([1, 1, 1, 2, 3, 7, 0.5, 0]),
        after_ms=st.one_of(st.just(0), st.integers(0, 400), st.integers(0, 15_000)),
    ),
    min_size=5,
    max_size=80,
)


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


def assert_sums_exact(client: redis.Redis, logs: list[tuple[str, str]]) -> None:
    for log, cost in logs:
        units = client.hgetall(cost)
        if b"" in units:
            entries = client.zrange(log, 0, -1)
            expected = sum(float(units.get(member, 1)) for member in entries)
            assert float(units[b""]) == pytest.approx(expected, abs=1e-9), (log, units, entries)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=ops)
@example(ops=[  # a weighted entry trimmed while another stays: the sum loses its units
    Op("acquire", "lone", 0, 3, 0), Op("acquire", "pooled", 0, 7, 0),
    Op("acquire", "lone", 1, 2, 5_000), Op("acquire", "pooled", 1, 2, 0),
    Op("acquire", "lone", 2, 1, 6_000), Op("acquire", "pooled", 2, 1, 0),
])
def test_every_script_keeps_a_weighted_logs_sum_exact(client: redis.Redis, ops: list[Op]) -> None:
    prefix = f"throttle-test-{uuid.uuid4().hex[:12]}"
    gate = Gate(client, load_config(CONFIG), prefix=prefix)
    logs = logs_of(gate)
    now = BASE_S
    try:
        for op in ops:
            now += op.after_ms / 1000
            member = f"{op.tool}-{op.member}"
            if op.kind == "acquire":
                gate.acquire(op.tool, member, cost=op.number or 1, deadline_s=30, now_s=now)
                own = logs[0] if op.tool == "lone" else logs[1]
                units = client.hgetall(own[1])
                assert not units or b"" in units, "a hash that gives costs keeps a sum"
            elif op.kind == "release":
                gate.release(op.tool, member)
            elif op.kind == "settle":
                gate.settle(op.tool, member, op.number)
            else:
                gate.cool_down(op.tool, 0.2, member=member, now_s=now)
            assert_sums_exact(client, logs)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
