"""The gate's contract on the real Redis: one slot per member, release, deadlines, per-key
limits, key hygiene, expiry and script reloading. The clock is pinned (`now_s`) unless a test
says not. Most tools set `slot_margin = "0ms"` so that slots fall exactly one window apart;
the margin has tests of its own at the end.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis

from tests.support.reservations import reservations
from throttle import Action, Gate, InvalidToolCall, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

P = 1_700_000_000.0  # a pinned "now", in epoch seconds
CONFIG = load_config(
    {
        "defaults": {"slot_margin": "0ms"},
        "tools": {
            "one": {"limits": ["1/60s"], "max_delay": "10m"},
            "short": {"limits": ["1/60s"], "max_delay": "30s"},
            "weighted": {"limits": ["10/60s"], "max_delay": "10m"},
            "per_session": {"limits": ["1/60s"], "max_delay": "10m", "key": "session_id"},
            "fast": {"limits": ["1/1s"], "max_delay": "30s"},
            "half": {"limits": ["1/60s"], "max_delay": "30s"},
            "tenth": {"limits": ["1/10s"], "max_delay": "30s"},
            "margined": {"limits": ["1/60s"], "max_delay": "10m", "slot_margin": "250ms"},
        },
    }
)
HOSTILE_KEYS: list[Any] = [
    "{",
    "}",
    "{one}",
    ":",
    "*",
    "\n",
    "x" * 10_240,
    "\udcff",
    "",
    0,
    [1, "}"],
]


@pytest.fixture
def gate(redis_client: redis.Redis, prefix: str) -> Gate:
    return Gate(redis_client, CONFIG, prefix=prefix)


def log_of(client: redis.Redis, prefix: str, tool: str, key: Any = None) -> dict[str, float]:
    entries = client.zrange(tool_keys(prefix, tool, key).log, 0, -1, withscores=True)
    return {member.decode(): score / 1000 for member, score in entries}


def test_a_member_acquiring_twice_takes_one_slot(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    first = gate.acquire("one", "A", now_s=P)
    again = gate.acquire("one", "A", now_s=P + 1)
    assert (first.action, first.reason, first.slot_at) == (Action.ADMIT, "admitted", P)
    assert (again.action, again.reason, again.slot_at) == (Action.ADMIT, "readmitted", P)

    reserved = gate.acquire("one", "B", now_s=P + 1)
    early = gate.acquire("one", "B", now_s=P + 31)
    assert (reserved.action, reserved.reason, reserved.slot_at) == (
        Action.DELAY,
        "reserved",
        P + 60,
    )
    assert reserved.wait_s == pytest.approx(59)
    assert (early.action, early.reason, early.slot_at) == (Action.DELAY, "early", P + 60)
    assert early.wait_s == pytest.approx(29)

    assert log_of(redis_client, prefix, "one") == {"A": P, "B": P + 60}
    assert gate.acquire("one", "C", now_s=P + 31).slot_at == P + 120


def test_the_same_member_twice_on_the_real_clock_takes_one_slot(gate: Gate) -> None:
    first, again = gate.acquire("one", "A"), gate.acquire("one", "A")
    assert (first.action, again.action, again.reason) == (Action.ADMIT, Action.ADMIT, "readmitted")
    assert again.slot_at == first.slot_at
    assert gate.acquire("one", "B").slot_at == pytest.approx(first.slot_at + 60, abs=1e-3)


def test_a_reservation_is_admitted_when_it_falls_due(gate: Gate) -> None:
    gate.acquire("one", "A", now_s=P)
    assert gate.acquire("one", "B", now_s=P).slot_at == P + 60
    due = gate.acquire("one", "B", now_s=P + 60)
    assert (due.action, due.reason, due.wait_s, due.slot_at) == (
        Action.ADMIT,
        "reservation",
        0,
        P + 60,
    )
    assert gate.acquire("one", "B", now_s=P + 61).reason == "readmitted"


def test_release_frees_a_reservation_for_the_next_caller_but_never_an_admission(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    assert gate.acquire("one", "A", now_s=P).action is Action.ADMIT
    assert gate.acquire("one", "B", now_s=P).slot_at == P + 60

    assert gate.release("one", "B") is True
    assert gate.release("one", "B") is False
    assert gate.release("one", "never-seen") is False
    taken = gate.acquire("one", "C", now_s=P + 1)
    assert (taken.action, taken.slot_at) == (Action.DELAY, P + 60)

    assert gate.release("one", "A") is False, "an admission already made is never released"
    assert log_of(redis_client, prefix, "one") == {"A": P, "C": P + 60}
    assert list(reservations(redis_client, tool_keys(prefix, "one"))) == [b"C"]


def test_a_released_weighted_reservation_gives_back_its_units(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    assert gate.acquire("weighted", "A", cost=10, now_s=P).action is Action.ADMIT
    assert gate.acquire("weighted", "B", cost=4, now_s=P).slot_at == P + 60
    assert gate.acquire("weighted", "C", cost=6, now_s=P).slot_at == P + 60
    assert redis_client.hget(tool_keys(prefix, "weighted").cost, "C") == b"6"
    assert gate.release("weighted", "C") is True
    assert redis_client.hget(tool_keys(prefix, "weighted").cost, "C") is None
    # Without the release, 6 more units would have to wait until P + 120.
    assert gate.acquire("weighted", "E", cost=6, now_s=P).slot_at == P + 60


def test_a_slot_past_the_deadline_falls_back_and_reserves_nothing(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    gate.acquire("short", "A", now_s=P)
    refused = gate.acquire("short", "B", now_s=P)
    assert (refused.action, refused.reason, refused.wait_s) == (Action.FALLBACK, "deadline", 0)
    assert refused.slot_at == P + 60, "the answer says which slot would have been given"
    tighter = gate.acquire("one", "X", now_s=P)
    assert tighter.action is Action.ADMIT
    assert gate.acquire("one", "Y", deadline_s=59.9, now_s=P).action is Action.FALLBACK
    assert gate.acquire("one", "Y", deadline_s=60, now_s=P).action is Action.DELAY
    assert log_of(redis_client, prefix, "short") == {"A": P}
    assert len(reservations(redis_client, tool_keys(prefix, "short"))) == 0


def test_a_cost_above_every_window_falls_back_at_once(gate: Gate) -> None:
    decision = gate.acquire("weighted", "big", cost=11, now_s=P)
    assert (decision.action, decision.reason) == (Action.FALLBACK, "cost_exceeds_limit")
    assert gate.acquire("weighted", "fits", cost=10, now_s=P).action is Action.ADMIT


@pytest.mark.parametrize("cost", [0, -1, float("nan")])
def test_a_cost_that_is_not_positive_is_an_invalid_call(gate: Gate, cost: float) -> None:
    with pytest.raises(InvalidToolCall, match="cost must be greater than zero"):
        gate.acquire("one", "A", cost=cost)


def test_script_flush_between_calls_does_not_break_the_next_call(
    gate: Gate, redis_client: redis.Redis
) -> None:
    assert gate.acquire("one", "A", now_s=P).action is Action.ADMIT
    redis_client.script_flush()
    assert gate.acquire("one", "B", now_s=P).slot_at == P + 60
    redis_client.script_flush()
    assert gate.release("one", "B") is True
    redis_client.script_flush()
    assert gate.acquire("one", "A", now_s=P + 1).reason == "readmitted"


# --- per-key limits ---------------------------------------------------------------------


def test_different_key_values_are_limited_independently(gate: Gate) -> None:
    first = gate.acquire("per_session", "a1", key="alice", now_s=P)
    other = gate.acquire("per_session", "b1", key="bob", now_s=P)
    second = gate.acquire("per_session", "a2", key="alice", now_s=P)
    assert (first.action, other.action) == (Action.ADMIT, Action.ADMIT)
    assert (second.action, second.slot_at) == (Action.DELAY, P + 60)
    assert gate.release("per_session", "a2", key="bob") is False, "bob's keys hold no a2"
    assert gate.release("per_session", "a2", key="alice") is True


def test_a_per_key_tool_without_its_key_is_an_invalid_call_naming_the_field(gate: Gate) -> None:
    with pytest.raises(InvalidToolCall, match="session_id") as caught:
        gate.acquire("per_session", "a1")
    assert caught.value.tool == "per_session"
    with pytest.raises(InvalidToolCall, match="session_id"):
        gate.release("per_session", "a1")


@pytest.mark.parametrize("value", HOSTILE_KEYS, ids=lambda value: repr(value)[:16])
def test_hostile_key_values_make_short_keys_under_the_prefix_in_the_tools_hash_tag(
    gate: Gate, redis_client: redis.Redis, prefix: str, value: Any
) -> None:
    assert gate.acquire("per_session", "m1", key=value, now_s=P).action is Action.ADMIT
    assert gate.acquire("per_session", "m2", key=value, now_s=P).action is Action.DELAY
    keys = sorted(key.decode() for key in redis_client.scan_iter(match=f"{prefix}:*"))
    assert len(keys) == 2, keys  # log and adm (no costs: every call costs 1)
    for key in keys:
        assert key.startswith(f"{prefix}:{{per_session|")
        assert len(key) <= len(prefix) + 45
        tag = key[key.index("{") + 1 : key.index("}")]
        assert re.fullmatch(r"per_session\|[0-9a-f]{24}", tag), tag
    assert redis_client.keys(f"{prefix}:{{one}}*") == []
    assert gate.acquire("one", "m1", now_s=P).action is Action.ADMIT, "other tools are untouched"


# --- expiry -----------------------------------------------------------------------------


def test_keys_of_an_idle_tool_expire_within_two_longest_windows(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    """A TTL only rises, with a window of headroom, so most calls merely read it."""
    log = tool_keys(prefix, "one").log
    slack = 100  # milliseconds the TTL ticks down between the script and the read
    gate.acquire("one", "A", now_s=P)
    assert 61_000 - slack <= redis_client.pttl(log) <= 121_000
    gate.acquire("one", "B", now_s=P)  # reserved at +60 s: its window ends at +120 s
    assert 121_000 - slack <= redis_client.pttl(log) <= 181_000
    assert 121_000 - slack <= redis_client.pttl(tool_keys(prefix, "one").adm) <= 181_000


@pytest.mark.parametrize("lateness_s", [0, 0.5], ids=["on time", "late"])
def test_the_log_outlives_every_reservation_in_it(
    gate: Gate, redis_client: redis.Redis, prefix: str, lateness_s: float
) -> None:
    for n, member in enumerate(["A", *(f"R{i}" for i in range(1, 11))]):
        assert gate.acquire("fast", member, now_s=P).slot_at == P + n
    now = P + 1 + lateness_s
    assert gate.acquire("fast", "R1", now_s=now).reason == "reservation"
    latest_slot = P + 10
    ttl_ms = redis_client.pttl(tool_keys(prefix, "fast").log)
    # The log must live at least until the last reservation falls due.
    assert ttl_ms >= (latest_slot - now) * 1000, ttl_ms


@pytest.mark.slow
def test_a_reservation_survives_a_released_neighbour_and_a_short_lateness(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    """1/1s: A runs, B, C, D are reserved at +1, +2, +3 s. B runs on time, C is revoked
    (released), D comes back 0.4 s late. E, arriving at +3.3 s, must queue behind D."""
    for n, member in enumerate("ABCD"):
        assert gate.acquire("fast", member, now_s=P).slot_at == P + n
    assert gate.acquire("fast", "B", now_s=P + 1).action is Action.ADMIT
    assert gate.release("fast", "C") is True
    time.sleep(2.2)  # real time passes from B's admission to E's arrival
    newcomer = gate.acquire("fast", "E", now_s=P + 3.3)
    returning = gate.acquire("fast", "D", now_s=P + 3.4)
    assert (returning.action, returning.reason) == (Action.ADMIT, "reservation")
    assert (newcomer.action, newcomer.slot_at) == (Action.DELAY, P + 4)


# --- memory ------------------------------------------------------------------------------


def documented_bound(tool: str) -> float:
    """docs/gate.md: per key at most max x (2 + ceil((max_delay + margin) / window)) entries.

    (DESIGN.md's max x (1 + max_delay / window) misses the rounding up, the margin, and the
    window that calls coming back late may share with the reservations behind them.)
    """
    config = CONFIG.tool(tool)
    (limit,) = config.limits
    spread = -(-(config.max_delay_ms + config.slot_margin_ms) // limit.window_ms)
    return limit.max * (2 + spread)


def test_the_log_stays_within_the_documented_bound_when_max_delay_is_not_a_whole_window(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    """1/60s with max_delay 30s: A runs at 0, B arrives at 31 s and is reserved at 60 s. Both
    entries are needed (A is still in B's window): DESIGN.md's formula says 1.5."""
    gate.acquire("half", "A", now_s=P)
    assert gate.acquire("half", "B", now_s=P + 31).slot_at == P + 60
    assert redis_client.zcard(tool_keys(prefix, "half").log) <= documented_bound("half")


def test_the_log_stays_within_the_documented_bound_when_calls_come_back_late(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    """1/10s with max_delay 30s. R1 comes back 2 s late, so R2 (due at 20 s,
    not back yet at 21 s) still shares a window with it while X and Y queue behind R3."""
    for n, member in enumerate(["A", "R1", "R2", "R3"]):
        assert gate.acquire("tenth", member, now_s=P).slot_at == P + 10 * n
    assert gate.acquire("tenth", "R1", now_s=P + 12).reason == "reservation"
    assert gate.acquire("tenth", "X", now_s=P + 12.5).slot_at == P + 40
    assert gate.acquire("tenth", "Y", now_s=P + 21).slot_at == P + 50
    assert redis_client.zcard(tool_keys(prefix, "tenth").log) <= documented_bound("tenth")


# --- the slot margin --------------------------------------------------------------------


def test_a_reservation_is_placed_one_window_plus_the_margin_after_the_slot_it_waits_for(
    gate: Gate,
) -> None:
    assert CONFIG.tool("margined").slot_margin_ms == 250
    gate.acquire("margined", "A", now_s=P)
    assert gate.acquire("margined", "B", now_s=P).slot_at == P + 60.25
    assert gate.acquire("margined", "C", now_s=P).slot_at == P + 120.5


def test_an_admission_keeps_half_the_margin_after_the_window(gate: Gate) -> None:
    gate.acquire("margined", "A", now_s=P)
    too_soon = gate.acquire("margined", "B", now_s=P + 60.124)
    assert (too_soon.action, too_soon.slot_at) == (Action.DELAY, P + 60.25)
    assert gate.release("margined", "B") is True
    decision = gate.acquire("margined", "C", now_s=P + 60.125)
    assert (decision.action, decision.slot_at) == (Action.ADMIT, P + 60.125)


def test_a_return_late_by_less_than_half_the_margin_holds_up_nobody(gate: Gate) -> None:
    gate.acquire("margined", "A", now_s=P)
    gate.acquire("margined", "B", now_s=P)  # reserved at P + 60.25
    gate.acquire("margined", "C", now_s=P)  # reserved at P + 120.5
    assert gate.acquire("margined", "B", now_s=P + 60.37).reason == "reservation"
    assert gate.acquire("margined", "C", now_s=P + 120.5).reason == "reservation"


def test_without_a_margin_a_late_return_delays_the_next_reservation(gate: Gate) -> None:
    gate.acquire("one", "A", now_s=P)
    gate.acquire("one", "B", now_s=P)  # reserved at P + 60
    gate.acquire("one", "C", now_s=P)  # reserved at P + 120
    assert gate.acquire("one", "B", now_s=P + 60.2).reason == "reservation"
    late = gate.acquire("one", "C", now_s=P + 120)
    assert (late.action, late.reason, late.slot_at) == (Action.DELAY, "late", P + 120.2)
    assert late.wait_s == pytest.approx(0.2)


def test_the_margin_counts_in_the_lifetime_of_the_keys(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    gate.acquire("margined", "A", now_s=P)
    # window + margin + 1 s, plus a window (and margin) of headroom
    assert 61_250 <= redis_client.pttl(tool_keys(prefix, "margined").log) <= 2 * 60_250 + 1000


def test_a_due_call_with_a_fractional_slot_is_not_counted_out_twice(
    redis_client: redis.Redis, prefix: str
) -> None:
    # Even pacing gives slots such as ...13333.3333 ms. The due check once cut bounds to
    # 3 decimals, so a call's own reservation fell inside "the due calls behind it" and was
    # subtracted twice: m6 was admitted into a full window.
    config = load_config({"tools": {"even3": {
        "limits": ["3/8s"], "max_delay": "60s", "pace": "even", "slot_margin": "0ms",
    }}})
    gate = Gate(redis_client, config, prefix=prefix)
    for member in ("m0", "m1", "m2"):
        assert gate.acquire("even3", member, now_s=P).action is Action.ADMIT
    slots = [gate.acquire("even3", f"m{i}", now_s=P).slot_at - P for i in range(3, 7)]
    assert slots == pytest.approx([8, 8 + 8 / 3, 8 + 16 / 3, 16])
    for member, back_at in (("m3", 8.005), ("m4", 10.667), ("m5", 13.334)):
        assert gate.acquire("even3", member, now_s=P + back_at).action is Action.ADMIT
    decision = gate.acquire("even3", "m6", now_s=P + 16.001)
    assert (decision.action, decision.reason) == (Action.DELAY, "late")
    assert decision.slot_at == pytest.approx(P + 16.005)


def test_an_admitted_member_asking_again_is_readmitted_only_with_its_own_receipt(
    gate: Gate, redis_client: redis.Redis, prefix: str
) -> None:
    """Receipts read '<message tag>|<delivery nonce>'. The same delivery asking again (its
    answer was lost) is 'readmitted'; the same message delivered again is a 'rerun';
    another message with the same id is 'reused'. Only the first admission counts."""
    first = gate.acquire("one", "A", now_s=P, receipt="tag-1|d1")
    again = gate.acquire("one", "A", now_s=P + 1, receipt="tag-1|d1")
    redelivered = gate.acquire("one", "A", now_s=P + 2, receipt="tag-1|d2")
    other = gate.acquire("one", "A", now_s=P + 3, receipt="tag-2|d3")
    untagged = gate.acquire("one", "A", now_s=P + 4, receipt="|d4")
    assert [d.reason for d in (first, again, redelivered, other, untagged)] == [
        "admitted", "readmitted", "rerun", "reused", "reused"]
    assert gate.acquire("one", "A", now_s=P + 5, receipt="|d4").reason == "readmitted"
    assert gate.acquire("one", "A", now_s=P + 6).reason == "readmitted"  # no receipt passed
    assert log_of(redis_client, prefix, "one") == {"A": P}  # counted once
    receipts = tool_keys(prefix, "one").log.removesuffix(":log") + ":receipts"
    assert redis_client.hgetall(receipts) == {b"A": b"|d4"}
    # A receipt leaves with its member's log entry.
    gate.acquire("one", "B", now_s=P + 200, receipt="t|d5")
    assert redis_client.hgetall(receipts) == {b"B": b"t|d5"}
    gate.cool_down("one", 1, member="B", now_s=P + 201)  # the upstream refused B
    gate.acquire("one", "C", now_s=P + 300, receipt="t|d6")
    assert redis_client.hgetall(receipts) == {b"C": b"t|d6"}
