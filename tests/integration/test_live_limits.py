"""Live limits on the real Redis gate (pinned clock): an override set with
`throttle.overrides` replaces the file's limits from the next decision on, a tier applies to
its key value only, a pool's override scales by the class's share, and a reset goes back."""

from __future__ import annotations

import pytest
import redis

from throttle import Action, Gate, load_config
from throttle.errors import ConfigError
from throttle.overrides import (
    parse_limits,
    read_overrides,
    reset_override,
    set_override,
)

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
CONFIG = load_config(
    {
        "defaults": {"slot_margin": "0ms"},
        "pools": {"llm": {"limits": ["10/60s"], "shares": {"high": 1.0, "low": 0.5}}},
        "tools": {
            "plain": {"limits": ["3/10s"], "max_delay": "1m"},
            "tenant": {"limits": ["2/10s"], "max_delay": "1m", "key": "tenant"},
            "pooled": {"limits": ["100/10s"], "max_delay": "1m", "pool": "llm",
                       "priority": "low"},
        },
    }
)


def _admitted(gate: Gate, tool: str, count: int, at_s: float, tag: str, **kw: object) -> int:
    """How many of `count` new calls at `at_s` are admitted at once (the others give their
    reservation back, so that the next batch is not queued behind them)."""
    admitted = 0
    for i in range(count):
        decision = gate.acquire(tool, f"{tag}-{i}", now_s=at_s, **kw)  # type: ignore[arg-type]
        admitted += decision.action is Action.ADMIT
        if decision.action is Action.DELAY:
            gate.release(tool, f"{tag}-{i}", key=kw.get("key"))
    return admitted


def test_a_raised_limit_applies_from_the_next_decision(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 3, P, "a") == 3
    assert gate.acquire("plain", "x", now_s=P).action is Action.DELAY
    assert gate.release("plain", "x")
    set_override(gate.client, CONFIG, prefix, parse_limits(["6/10s"]), tool="plain")
    # The same window now holds 6: three more, no restart, no new gate.
    assert _admitted(gate, "plain", 5, P + 1, "b") == 3


def test_a_lowered_limit_holds_every_window_after_the_change(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 3, P, "a") == 3
    set_override(gate.client, CONFIG, prefix, parse_limits(["1/10s"]), tool="plain")
    # The window (P - 10 s, P + 9.9 s] already holds 3 > 1: nothing more until it empties.
    decision = gate.acquire("plain", "b", now_s=P + 1)
    assert decision.action is Action.DELAY
    assert decision.slot_at >= P + 10
    # Then one per 10 s, never two.
    assert gate.acquire("plain", "b", now_s=decision.slot_at).action is Action.ADMIT
    assert gate.acquire("plain", "c", now_s=decision.slot_at + 1).action is Action.DELAY


def test_a_reservation_made_under_a_higher_limit_waits_for_room_under_the_lower(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 3, P, "a") == 3
    reserved = gate.acquire("plain", "r", now_s=P + 1)
    assert reserved.action is Action.DELAY and reserved.slot_at == pytest.approx(P + 10)
    set_override(gate.client, CONFIG, prefix, parse_limits(["1/20s"]), tool="plain")
    # At its slot the trailing 20 s window still holds three: it is told to come back late.
    late = gate.acquire("plain", "r", now_s=reserved.slot_at)
    assert late.action is Action.DELAY and late.reason == "late"
    assert late.slot_at >= P + 20
    assert gate.acquire("plain", "r", now_s=late.slot_at).action is Action.ADMIT


def test_a_reset_goes_back_to_the_files_limits(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    set_override(gate.client, CONFIG, prefix, parse_limits(["1/10s"]), tool="plain")
    assert _admitted(gate, "plain", 3, P, "a") == 1
    assert reset_override(gate.client, CONFIG, prefix, tool="plain")
    assert _admitted(gate, "plain", 3, P + 1, "b") == 2
    assert read_overrides(gate.client, prefix) == []


def test_a_tier_for_one_key_leaves_other_keys_on_the_default(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    set_override(gate.client, CONFIG, prefix, parse_limits(["5/10s"]), tool="tenant", key="acme")
    assert _admitted(gate, "tenant", 8, P, "acme", key="acme") == 5
    assert _admitted(gate, "tenant", 8, P, "other", key="other") == 2
    assert _admitted(gate, "tenant", 8, P, "third", key="third") == 2


def test_a_pool_override_is_scaled_by_the_class_share(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    set_override(gate.client, CONFIG, prefix, parse_limits(["4/60s"]), pool="llm")
    # The low class has half the pool: 2 of the overridden 4 (not 5 of the file's 10).
    assert _admitted(gate, "pooled", 6, P, "a") == 2


def test_several_limits_replace_all_of_the_files(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    set_override(gate.client, CONFIG, prefix, parse_limits(["10/60s", "2/1s"]), tool="plain")
    assert _admitted(gate, "plain", 5, P, "a") == 2
    assert _admitted(gate, "plain", 5, P + 1, "b") == 2


def test_overrides_are_listed_with_who_set_them_and_a_rising_version(
    redis_client: redis.Redis, prefix: str
) -> None:
    first = set_override(redis_client, CONFIG, prefix, parse_limits(["6/10s"]), tool="plain",
                         set_by="ops@example")
    second = set_override(redis_client, CONFIG, prefix, parse_limits(["9/10s"]),
                          tool="tenant", key="acme")
    listed = read_overrides(redis_client, prefix)
    assert [o.target for o in listed] == ["plain", "tenant --key acme"]
    assert listed[0].set_by == "ops@example" and listed[0].limits_text == "6/10s"
    assert second.version > first.version


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tool": "nope"}, "unknown tool 'nope'"),
        ({"pool": "nope"}, "unknown pool 'nope'"),
        ({"tool": "plain", "key": "acme"}, "has no key argument"),
        ({"tool": "plain", "pool": "llm"}, "not both"),
        ({}, "name a tool"),
    ],
)
def test_an_override_that_cannot_apply_says_why(
    redis_client: redis.Redis, prefix: str, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        set_override(redis_client, CONFIG, prefix, parse_limits(["1/1s"]), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "0/1s", "x/1s", "5", "5/0s", "5/99999h"])
def test_a_bad_limit_text_is_refused_with_its_form(text: str) -> None:
    with pytest.raises(ConfigError, match=r"limit|at least one"):
        parse_limits([text] if text else [])


QUOTA = load_config(
    {
        "broker": {"visibility_timeout": "3h"},
        "defaults": {"slot_margin": "0ms"},
        "tools": {
            "daily": {"limits": ["100/1s", "3/1d"], "max_delay": "1m",
                      "quota_tz": "Europe/Paris"},
            "long": {"limits": ["100/1s", "3/1d"], "max_delay": "2h"},
            "tenant": {"limits": ["1/1ms", "2/1d"], "max_delay": "1m", "key": "tenant"},
        },
    }
)
# 23:59:30 in Paris (UTC+1 in November): 30 s before the quota resets.
BEFORE_MIDNIGHT = 1_700_002_800.0 - 30


def test_a_daily_quota_resets_at_midnight_in_its_time_zone(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, QUOTA, prefix=prefix)
    at = BEFORE_MIDNIGHT
    assert [gate.acquire("daily", f"a{i}", now_s=at + i).action for i in range(3)] == [
        Action.ADMIT] * 3
    spent = gate.acquire("daily", "b", now_s=at + 5)
    # Spent for today: come back at midnight (25 s later, within the 1 min deadline).
    assert spent.action is Action.DELAY and spent.reason == "quota"
    assert spent.slot_at == pytest.approx(1_700_002_800.0)
    assert gate.acquire("daily", "b", now_s=at + 29.9).reason == "quota"
    # At midnight the quota is whole again: three more, then spent until the next midnight.
    midnight = 1_700_002_800.0
    assert [gate.acquire("daily", f"c{i}", now_s=midnight + i).action for i in range(3)] == [
        Action.ADMIT] * 3
    late = gate.acquire("daily", "d", now_s=midnight + 10)
    assert late.action is Action.FALLBACK and late.reason == "quota"


def test_a_spent_quota_with_a_long_deadline_waits_for_the_reset(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, QUOTA, prefix=prefix)
    at = 1_700_000_000.0 + 1200  # 22:33:20 UTC, 1 h 26 min 40 s before midnight
    for i in range(3):
        assert gate.acquire("long", f"a{i}", now_s=at).action is Action.ADMIT
    wait = gate.acquire("long", "b", now_s=at)
    assert wait.action is Action.DELAY and wait.reason == "quota"
    assert wait.slot_at == 1_700_006_400.0  # midnight UTC
    assert gate.acquire("long", "b", now_s=wait.slot_at).action is Action.ADMIT


def test_a_quota_is_per_key_value_and_a_dropped_reservation_gives_its_units_back(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    from throttle.keys import keys_for
    from throttle.quotas import read_quotas

    gate = Gate(redis_url, QUOTA, prefix=prefix)
    at = 1_700_000_000.0
    for i in range(2):
        assert gate.acquire("tenant", f"a{i}", key="acme", now_s=at + i).action is Action.ADMIT
    assert gate.acquire("tenant", "a2", key="acme", now_s=at + 2).reason == "quota"
    assert gate.acquire("tenant", "b0", key="other", now_s=at + 2).action is Action.ADMIT
    tool = QUOTA.tool("tenant")
    use = read_quotas(redis_client, tool, keys_for(prefix, tool, "acme"), now_s=at)
    assert [(u.used, u.remaining, u.resets_at_s) for u in use] == [(2, 0, 1_700_006_400.0)]
    # A reservation dropped (here by a cooldown over its slot) gives its units back.
    held = gate.acquire("tenant", "c0", key="third", now_s=at)
    reserved = gate.acquire("tenant", "c1", key="third", now_s=at)
    assert held.action is Action.ADMIT and reserved.action is Action.DELAY
    third = keys_for(prefix, tool, "third")
    assert read_quotas(redis_client, tool, third, now_s=at)[0].used == 2
    assert gate.acquire("tenant", "c2", key="third", now_s=at).reason == "quota"
    gate.cool_down("tenant", 5, key="third", now_s=at)
    assert gate.acquire("tenant", "c1", key="third", now_s=at).reason == "cooldown"
    assert read_quotas(redis_client, tool, third, now_s=at)[0].used == 1


def test_a_daily_quota_needs_a_sliding_limit_and_a_known_time_zone() -> None:
    with pytest.raises(ConfigError, match="needs a sliding limit"):
        load_config({"tools": {"q": {"limits": ["5/1d"], "max_delay": "1s"}}})
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Base'"):
        load_config({"tools": {"q": {"limits": ["1/1s", "5/1d"], "max_delay": "1s",
                                     "quota_tz": "Mars/Base"}}})
    with pytest.raises(ConfigError, match="calendar day"):
        load_config({"tools": {"q": {"limits": ["1/1s", "5/2d"], "max_delay": "1s"}}})


@pytest.mark.parametrize(
    "garbage", ["", "abc", "5", "0 1000", "-3 1000", "5 x", "nan 5", "inf 1000", "5 nan"]
)
def test_a_corrupt_override_value_leaves_the_files_limits_in_force(
    redis_url: str, prefix: str, garbage: str
) -> None:
    from throttle.keys import overrides_key

    gate = Gate(redis_url, CONFIG, prefix=prefix)
    gate.client.hset(overrides_key(prefix, CONFIG.tool("plain")), "tool:plain", garbage)
    assert _admitted(gate, "plain", 5, P, "a") == 3
