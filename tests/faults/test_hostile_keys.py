"""Per-key limits fed hostile key values, and 100,000 distinct ones, on a private Redis.

Key values come from task arguments, so a caller controls them. Whatever they hold (hash-tag
braces, glob characters, newlines, 10 KB strings, lone surrogates, invalid UTF-8, bytes,
numbers that print alike), every key stays short, inside the tool's namespace under one
hash tag, with a TTL; no two values share a key; and memory stays within the bound
docs/gate.md states.
"""

from __future__ import annotations

import math
import multiprocessing
import re
from typing import Any

import pytest
import redis

from tests.support.reservations import reservations
from tests.support.servers import RedisServer
from throttle import Action, Gate, InvalidToolCall, load_config
from throttle.keys import redelivery_key, tool_keys

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

CONFIG = {
    "tools": {
        "per_key": {"limits": ["2/10s"], "max_delay": "30s", "key": "tenant"},
        "per_key_long": {"limits": ["2/10m"], "max_delay": "30m", "key": "tenant"},
        "flooded": {"limits": ["100/1s"], "max_delay": "5s", "key": "tenant"},
    }
}
HOSTILE: list[Any] = [
    "", " ", "{", "}", "{}", "}{", "{a}", ":", "::", "*", "?", "[a-z]", "\\", "|", "a|b",
    "\n", "\r\n", "a\nb", "\x00", "\t", "é", "e\u0301", "😀", "\ud800", "a\udfffb",
    "x" * 10_000, "{" * 10_000, "throttle:{t}:log", "KEYS *", "FLUSHALL\r\n",
    b"", b"{", b"\xff\xfe", b"\x80\x81", b"\x00" * 10_000, b"1",
    "1", 1, 1.0, True, False, 0, -1, 10**30, 1e308, "null", [1], ["1"], [], {}, {"a": 1},
]
# <prefix>:{<tool>|<24 hex digits>}:<lowercase name>[:...]: the value only as its digest.
KEY_TEXT = r"{prefix}:\{{{tool}(\|[0-9a-f]{{24}})?\}}(:[a-z_]+)+"
DISTINCT_KEYS, FILL_PROCESSES = 100_000, 2
# docs/gate.md, "Memory": about 230 bytes per key value holding one entry; about 110 bytes
# per log entry, and as much again in the reservation index while it is a reservation.
MAX_BYTES_PER_KEY_VALUE, MAX_BYTES_PER_ENTRY = 300, 120


def key_pattern(prefix: str, tool: str) -> re.Pattern[str]:
    return re.compile(KEY_TEXT.format(prefix=re.escape(prefix), tool=tool))


def all_keys(client: redis.Redis) -> list[str]:
    return [key.decode() for key in client.scan_iter(count=5000)]


def ttls(client: redis.Redis, keys: list[str]) -> list[int]:
    found: list[int] = []
    for start in range(0, len(keys), 5000):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 5000]:
            pipe.pttl(key)
        found += pipe.execute()
    return found


def test_hostile_key_values_get_short_distinct_expiring_keys_inside_the_prefix(
    redis_server: RedisServer, redis_client: redis.Redis, prefix: str
) -> None:
    gate = Gate(redis_server.url(), load_config(CONFIG), prefix=prefix)
    pattern = key_pattern(prefix, "per_key")
    longest = 0
    for n, value in enumerate(HOSTILE):
        keys = tool_keys(prefix, "per_key", value)
        for key in [*keys.as_list(), redelivery_key(keys, "m")]:
            assert key.isascii() and key.isprintable(), key
            longest = max(longest, len(key))
        assert all((m := pattern.fullmatch(key)) and m[1] for key in keys.as_list()), value
        # Two calls fit each value's own 2/10s; the third waits: values share no window.
        answers = [gate.acquire("per_key", f"v{n}-{i}", key=value).action for i in range(3)]
        assert answers == [Action.ADMIT, Action.ADMIT, Action.DELAY], (value, answers)
    with pytest.raises(InvalidToolCall):
        gate.acquire("per_key", "no-key", key=None)

    stored = all_keys(redis_client)
    tags = {m[1] for key in stored if (m := pattern.fullmatch(key)) and m[1]}
    expiries = ttls(redis_client, stored)
    print(
        f"\nhostile key values: {len(HOSTILE)} values -> {len(tags)} distinct hash tags, "
        f"{len(stored)} keys, longest {longest} characters, outside the prefix "
        f"{sum(not pattern.fullmatch(k) for k in stored)}, without a TTL "
        f"{sum(t <= 0 for t in expiries)}"
    )
    assert len(tags) == len(HOSTILE)
    assert all(pattern.fullmatch(key) for key in stored)
    assert all(ttl > 0 for ttl in expiries)
    assert longest <= len(prefix) + 64
    gate.close()


def _fill(job: tuple[str, str, int, int]) -> int:
    """Decide one call for each key value start..stop-1; returns how many were admitted.

    The calls go in pipelined batches of 1,000 (the gate's own arguments and script, one
    EVALSHA each) so that 100,000 decisions take seconds on a busy machine, not a minute.
    """
    url, prefix, start, stop = job
    gate = Gate(url, load_config(CONFIG), prefix=prefix)
    gate.acquire("per_key_long", f"m{start}", key=key_value(start))  # loads the script
    admitted = 1
    for first in range(start + 1, stop, 1000):
        pipe = gate.client.pipeline(transaction=False)
        for i in range(first, min(first + 1000, stop)):
            keys, args = gate._acquire_call("per_key_long", f"m{i}", key_value(i), 1, None, None)
            gate._acquire(keys=keys, args=args, client=pipe)
        admitted += sum(raw[0] == b"admit" for raw in pipe.execute())
    gate.close()
    return admitted


def key_value(i: int) -> str:
    return f"tenant-{i}" if i % 2 else f"{{*}}:\n{i}"


def test_100000_distinct_key_values_take_100000_expiring_keys_within_the_memory_bound(
    redis_server: RedisServer, redis_client: redis.Redis, prefix: str
) -> None:
    warm = Gate(redis_server.url(), load_config(CONFIG), prefix=prefix)
    warm.acquire("per_key_long", "w", key="w")  # loads the script: not part of the growth
    warm.close()
    before = redis_client.info("memory")["used_memory"]
    share = DISTINCT_KEYS // FILL_PROCESSES
    jobs = [(redis_server.url(), prefix, n * share, (n + 1) * share) for n in range(FILL_PROCESSES)]
    with multiprocessing.get_context("spawn").Pool(FILL_PROCESSES) as pool:
        admitted = sum(pool.map(_fill, jobs, chunksize=1))
    grown = redis_client.info("memory")["used_memory"] - before

    warm_log = tool_keys(prefix, "per_key_long", "w").log
    keys = [key for key in all_keys(redis_client) if key != warm_log]
    pattern = key_pattern(prefix, "per_key_long")
    expiries = ttls(redis_client, keys)
    per_value = grown / DISTINCT_KEYS
    print(
        f"\n{DISTINCT_KEYS:,} distinct key values: admitted {admitted:,}, keys {len(keys):,} "
        f"(outside the prefix {sum(not pattern.fullmatch(k) for k in keys)}, without a TTL "
        f"{sum(t <= 0 for t in expiries)}), memory grew {grown / 2**20:.1f} MiB = "
        f"{per_value:.0f} B per key value (bound {MAX_BYTES_PER_KEY_VALUE} B)"
    )
    assert admitted == DISTINCT_KEYS
    assert len(keys) == DISTINCT_KEYS  # one log per value: no two values collide
    assert all(pattern.fullmatch(key) for key in keys)
    assert all(ttl > 0 for ttl in expiries)
    assert per_value <= MAX_BYTES_PER_KEY_VALUE


def test_a_flooded_key_value_holds_no_more_entries_and_bytes_than_the_documented_bound(
    redis_server: RedisServer, redis_client: redis.Redis, prefix: str
) -> None:
    """200 new calls every 0.25 s for 15 s (pinned clock) at 100/1s, max_delay 5s: none come
    back, so unused reservations fill the log until they expire."""
    config = load_config(CONFIG)
    tool = config.tool("flooded")
    limit = tool.limits[0]
    bound = limit.max * (
        2 + math.ceil((tool.max_delay_ms + tool.slot_margin_ms) / limit.window_ms)
    )
    gate = Gate(redis_server.url(), config, prefix=prefix)
    keys = tool_keys(prefix, "flooded", "flood")
    now_s, most, sizes = 1_000_000.0, 0, (0, 0, 0)
    for step in range(60):
        for i in range(200):
            gate.acquire("flooded", f"s{step}-{i}", key="flood", now_s=now_s)
        entries = redis_client.zcard(keys.log)
        if entries > most:
            reserved = len(reservations(redis_client, keys))
            log_bytes = redis_client.memory_usage(keys.log, samples=0) or 0
            rsv_bytes = redis_client.memory_usage(keys.adm, samples=0) or 0
            most, sizes = entries, (reserved, log_bytes, rsv_bytes)
        now_s += 0.25
    reserved, log_bytes, rsv_bytes = sizes
    print(
        f"\nflooded key value: at most {most} entries (bound {bound}), {reserved} of them "
        f"reservations; {log_bytes / most:.0f} B per log entry, "
        f"{rsv_bytes / max(reserved, 1):.0f} B per reservation index entry "
        f"(bound {MAX_BYTES_PER_ENTRY} B each)"
    )
    assert most <= bound
    assert log_bytes <= MAX_BYTES_PER_ENTRY * most
    assert rsv_bytes <= MAX_BYTES_PER_ENTRY * max(reserved, 1)
    assert redis_client.pttl(keys.log) > 0 and redis_client.pttl(keys.adm) > 0
    gate.close()
