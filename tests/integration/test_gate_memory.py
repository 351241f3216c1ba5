"""What a held (reserved) call costs in Redis: one entry of its tool's log, nothing more.

The log holds admissions and reservations (placement reads one ordered set of everything
taken). While it may hold reservations, the `adm` set names its admissions, so a
reservation is stored once; a log that holds none has no `adm`.
"""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.support.reservations import reservations
from throttle import Action, Gate, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
MAX, HELD = 10, 2_000
MAX_BYTES_PER_HELD_CALL = 150
CONFIG = load_config({
    "broker": {"visibility_timeout": "2h"},
    "tools": {"held": {"limits": [f"{MAX}/1s"], "max_delay": "59m"}},
})


def presence(client: redis.Redis, key: str, member: str) -> int:
    """1 when `member` is in `key` (a sorted set, hash or set), else 0."""
    kind = client.type(key).decode()
    if kind == "zset":
        return int(client.zscore(key, member) is not None)
    if kind == "hash":
        return int(client.hexists(key, member))
    if kind == "set":
        return int(client.sismember(key, member))
    return 0


def test_2000_reserved_calls_take_at_most_150_bytes_each_across_the_tools_keys(
    redis_client: redis.Redis, prefix: str
) -> None:
    gate = Gate(redis_client, CONFIG, prefix=prefix)
    ids = [str(uuid.uuid4()) for _ in range(MAX + HELD)]  # Celery's task ids: 36 characters
    answers = [gate.acquire("held", member, now_s=P) for member in ids]
    assert [a.action for a in answers] == [Action.ADMIT] * MAX + [Action.DELAY] * HELD
    keys = [key.decode() for key in redis_client.scan_iter(match=f"{prefix}:*")]
    total = sum(int(redis_client.memory_usage(key, samples=0) or 0) for key in keys)
    print(f"\n{HELD:,} reserved calls (and {MAX} admitted): {total:,} B in {len(keys)} keys, "
          f"{total / HELD:.0f} B per held call (bound {MAX_BYTES_PER_HELD_CALL})")
    assert total / HELD <= MAX_BYTES_PER_HELD_CALL
    assert len(reservations(redis_client, tool_keys(prefix, "held"))) == HELD
    gate.close()


def test_a_held_call_has_one_entry_across_the_tools_keys_and_an_admitted_one_two(
    redis_client: redis.Redis, prefix: str
) -> None:
    gate = Gate(redis_client, CONFIG, prefix=prefix)
    for n in range(MAX):
        assert gate.acquire("held", f"a{n}", now_s=P).action is Action.ADMIT
    held = gate.acquire("held", "r", now_s=P)
    assert held.action is Action.DELAY
    keys = [key.decode() for key in redis_client.scan_iter(match=f"{prefix}:*")]
    assert sum(presence(redis_client, key, "r") for key in keys) == 1, "the log alone"
    assert sum(presence(redis_client, key, "a0") for key in keys) == 2, "the log and adm"
    assert gate.acquire("held", "r", now_s=held.slot_at).reason == "reservation"
    assert sum(presence(redis_client, key, "r") for key in keys) == 2, "admitted: log and adm"
    gate.close()


def test_a_log_that_held_reservations_keeps_a_ttl_once_it_empties_and_fills_again(
    redis_client: redis.Redis, prefix: str
) -> None:
    gate = Gate(redis_client, CONFIG, prefix=prefix)
    keys = tool_keys(prefix, "held")
    for n in range(MAX + 1):  # the last one is reserved: adm names the admissions
        gate.acquire("held", f"c{n}", now_s=P)
    assert redis_client.exists(keys.adm)
    # 10 s on, every entry has left every window: the next call finds the log empty.
    assert gate.acquire("held", "next", now_s=P + 10).action is Action.ADMIT
    assert redis_client.pttl(keys.log) > 0
    assert not redis_client.exists(keys.adm), "no reservation left: nothing to tell apart"
    assert gate.acquire("held", "next", now_s=P + 10).reason == "readmitted"
    gate.close()
