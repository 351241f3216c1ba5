"""Live limits the script cannot read in one call, and daily quotas set live, on the real Redis
gate (pinned clock): a per-key tool's default (cached by each gate), a tool's, a tier's and a
pool's quotas, a pool's own daily quota, and a limit lowered below what is reserved."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from throttle import Action, AsyncGate, Gate, load_config
from throttle.keys import keys_for
from throttle.live_defaults import REFRESH_S
from throttle.overrides import parse_limits, read_overrides, reset_override, set_override
from throttle.quotas import read_pool_quotas, read_quotas

pytestmark = pytest.mark.redis

P = 1_700_000_000.0  # 22:13:20 UTC
MIDNIGHT = 1_700_006_400.0  # the next midnight UTC
CONFIG = load_config(
    {
        "broker": {"visibility_timeout": "3h"},
        "defaults": {"slot_margin": "0ms"},
        "pools": {"llm": {"limits": ["100/1s", "4/1d"], "shares": {"high": 1.0, "low": 0.5}}},
        "tools": {
            "tenant": {"limits": ["2/10s"], "max_delay": "1m", "key": "tenant"},
            "daily": {"limits": ["100/1s", "3/1d"], "max_delay": "1m"},
            "plain": {"limits": ["100/1s"], "max_delay": "1m"},
            "chat": {"limits": ["100/1s"], "max_delay": "1m", "pool": "llm", "priority": "high"},
            "batch": {"limits": ["100/1s"], "max_delay": "1m", "pool": "llm", "priority": "low"},
            "lowered": {"limits": ["10/1s"], "max_delay": "5s"},
        },
    }
)


def _admitted(gate: Gate, tool: str, count: int, at_s: float, tag: str, **kw: object) -> int:
    """How many of `count` new calls at `at_s` are admitted at once (a delayed one gives its
    reservation back)."""
    admitted = 0
    for i in range(count):
        decision = gate.acquire(tool, f"{tag}-{i}", now_s=at_s, **kw)  # type: ignore[arg-type]
        admitted += decision.action is Action.ADMIT
        if decision.action is Action.DELAY:
            gate.release(tool, f"{tag}-{i}", key=kw.get("key"))
    return admitted


def test_a_per_key_tools_default_set_live_applies_to_every_key_without_a_tier(
    redis_url: str, prefix: str
) -> None:
    gate, other = Gate(redis_url, CONFIG, prefix=prefix), Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "tenant", 5, P, "a", key="k1") == 2  # the file's 2/10s
    set_override(gate.client, CONFIG, prefix, parse_limits(["6/10s"]), tool="tenant", key="vip")
    set_override(gate.client, CONFIG, prefix, parse_limits(["4/10s"]), tool="tenant")
    # A gate that has not decided yet reads it on its first decision; one that has, within
    # REFRESH_S: after that every key value without a tier runs on the new default.
    assert _admitted(other, "tenant", 6, P, "b", key="k2") == 4
    time.sleep(REFRESH_S + 0.05)
    assert _admitted(gate, "tenant", 6, P, "c", key="k3") == 4
    assert _admitted(gate, "tenant", 6, P, "a2", key="k1") == 2  # k1's window held 2 already
    assert _admitted(gate, "tenant", 8, P, "v", key="vip") == 6  # the tier wins
    assert [o.target for o in read_overrides(gate.client, prefix)] == [
        "tenant", "tenant --key vip"]
    assert reset_override(gate.client, CONFIG, prefix, tool="tenant")
    time.sleep(REFRESH_S + 0.05)
    assert _admitted(gate, "tenant", 5, P, "d", key="k4") == 2  # back to the file's


def test_the_async_gate_reads_a_per_key_default_set_live_too(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    async def admitted(gate: AsyncGate, tag: str) -> int:
        answers = [await gate.acquire("tenant", f"{tag}-{i}", key=tag, now_s=P)
                   for i in range(6)]
        return sum(a.action is Action.ADMIT for a in answers)

    async def scenario() -> tuple[int, int]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        before = await admitted(gate, "x")
        set_override(redis_client, CONFIG, prefix, parse_limits(["5/10s"]), tool="tenant")
        await asyncio.sleep(REFRESH_S + 0.05)
        after = await admitted(gate, "y")
        await gate.aclose()
        return before, after

    assert asyncio.run(scenario()) == (2, 5)


def test_a_quota_set_live_replaces_the_files_and_keeps_todays_use(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "daily", 4, P, "a") == 3  # the file's 3/1d
    # Only a quota given: the sliding limits stay the file's, the 3 used today count.
    set_override(redis_client, CONFIG, prefix, parse_limits(["5/1d"]), tool="daily")
    assert _admitted(gate, "daily", 4, P + 1, "b") == 2
    assert gate.acquire("daily", "c", now_s=P + 2).reason == "quota"
    assert [o.limits_text for o in read_overrides(redis_client, prefix)] == ["5/1d"]
    tool = CONFIG.tool("daily")
    use = read_quotas(redis_client, tool, keys_for(prefix, tool), P,
                      quotas=parse_limits(["5/1d"]))
    assert [(u.max, u.used) for u in use] == [(5, 5)]
    # Sliding limits and a quota together replace both; a reset goes back to the file's.
    set_override(redis_client, CONFIG, prefix, parse_limits(["1/1s", "7/1d"]), tool="daily")
    assert _admitted(gate, "daily", 4, P + 3, "d") == 1
    assert reset_override(redis_client, CONFIG, prefix, tool="daily")
    assert gate.acquire("daily", "e", now_s=P + 4).reason == "quota"  # 6 used of 3
    # At midnight the file's quota is whole again.
    assert _admitted(gate, "daily", 4, MIDNIGHT, "f") == 3


def test_a_quota_set_live_on_a_tool_without_one_on_a_tier_and_on_a_per_key_default(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    set_override(gate.client, CONFIG, prefix, parse_limits(["2/1d"]), tool="plain")
    assert _admitted(gate, "plain", 4, P, "a") == 2
    assert gate.acquire("plain", "b", now_s=P).reason == "quota"
    set_override(gate.client, CONFIG, prefix, parse_limits(["9/10s", "3/1d"]), tool="tenant",
                 key="acme")
    assert _admitted(gate, "tenant", 5, P, "acme", key="acme") == 3
    assert gate.acquire("tenant", "acme-x", key="acme", now_s=P + 30).reason == "quota"
    set_override(gate.client, CONFIG, prefix, parse_limits(["1/1d"]), tool="tenant")
    gate.refresh_defaults()  # (what the next decision after REFRESH_S does)
    assert _admitted(gate, "tenant", 3, P, "k", key="k") == 1
    assert gate.acquire("tenant", "k-x", key="k", now_s=P + 30).reason == "quota"
    assert _admitted(gate, "tenant", 3, P, "acme2", key="acme2") == 1


def test_a_pools_daily_quota_charges_every_tool_and_gives_each_class_its_share(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    # The low class may use half of the pool's 4 a day; the high class the rest of it.
    assert _admitted(gate, "batch", 4, P, "b") == 2
    assert gate.acquire("batch", "b-x", now_s=P + 1).reason == "quota"
    assert _admitted(gate, "chat", 4, P, "c") == 2
    spent = gate.acquire("chat", "c-x", now_s=P + 2)
    assert spent.action is Action.FALLBACK and spent.reason == "quota"  # midnight is too far
    pool = CONFIG.pools["llm"]
    assert [(u.max, u.used, u.resets_at_s) for u in read_pool_quotas(
        redis_client, prefix, pool, P)] == [(4, 4, MIDNIGHT)]
    # Raised live: the class's share applies to it too (the pool's use, 4, is the low
    # class's half of 8 already); then whole again at midnight.
    set_override(redis_client, CONFIG, prefix, parse_limits(["8/1d"]), pool="llm")
    assert _admitted(gate, "batch", 4, P + 3, "b2") == 0
    assert _admitted(gate, "chat", 6, P + 3, "c2") == 4
    assert _admitted(gate, "chat", 10, MIDNIGHT, "c3") == 8


def test_a_pool_takes_a_daily_quota_only_beside_a_sliding_limit_in_one_time_zone() -> None:
    from throttle.errors import ConfigError

    def pool(limits: list[str], tz: str = "UTC") -> dict[str, object]:
        return {"pools": {"p": {"limits": limits, "shares": {"a": 1.0}}},
                "tools": {"t": {"limits": ["1/1s", "5/1d"], "max_delay": "1s", "pool": "p",
                                "priority": "a", "quota_tz": tz}}}

    with pytest.raises(ConfigError, match=r"pool 'p', field 'limits'.*needs a sliding limit"):
        load_config(pool(["10/1d"]))
    with pytest.raises(ConfigError, match="count days in the pool's quota_tz"):
        load_config(pool(["10/1s", "10/1d"], tz="Asia/Tokyo"))
    assert load_config(pool(["10/1s", "10/1d"])).pools["p"].quotas[0].max == 10


def test_a_limit_lowered_below_what_is_reserved_never_lets_a_window_over_the_new_max(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """40 calls under 10/1s (30 reserved), then 3/1s: every reserved call runs or falls back,
    and every 1 s window ending at an admission after the change holds at most 3."""
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    answers = {f"m{i}": gate.acquire("lowered", f"m{i}", now_s=P) for i in range(40)}
    assert sum(a.action is Action.DELAY for a in answers.values()) == 30
    changed_at = P + 0.5
    set_override(redis_client, CONFIG, prefix, parse_limits(["3/1s"]), tool="lowered")
    admitted = {m: P for m, a in answers.items() if a.action is Action.ADMIT}
    fell_back, due = [], {m: a.slot_at for m, a in answers.items() if a.action is Action.DELAY}
    while due:  # each reserved call comes back at the time it was told, as a worker would
        member, at = min(due.items(), key=lambda item: item[1])
        now = max(at, changed_at)  # the worker passes what is left of the call's max_delay
        answer = gate.acquire("lowered", member, now_s=now, deadline_s=P + 5 - now)
        del due[member]
        if answer.action is Action.ADMIT:
            admitted[member] = max(at, changed_at)
        elif answer.action is Action.DELAY:
            # (held up past its window, its old slot left the log: it is placed anew)
            assert answer.reason in ("early", "late", "reserved")
            due[member] = answer.slot_at
        else:
            fell_back.append(member)
    after = [t for t in admitted.values() if t >= changed_at]
    busiest = max(sum(1 for u in admitted.values() if t - 1 < u <= t) for t in after)
    print(f"\nlowered 10/1s -> 3/1s over 30 reservations: {len(after)} admitted after the "
          f"change, {len(fell_back)} fell back, busiest window ending after it {busiest}")
    assert len(admitted) + len(fell_back) == 40  # every reserved call ran or fell back
    assert after and busiest <= 3
    assert fell_back  # 30 calls at 3/1s need 10 s: past max_delay (5 s) + 1 s, they fall back
