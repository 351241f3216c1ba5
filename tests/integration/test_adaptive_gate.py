"""Adaptive limits on the real Redis gate (pinned clock): what the upstream reports lowers the
effective limit that acquire.lua enforces in the same call, an operator's override stays and
caps it, 429s without headers drive it down and answers raise it back (AIMD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.servers import write_config
from throttle import Action, Gate, load_config
from throttle.adaptive import (
    APPROACH_WINDOWS,
    BACKOFF,
    PROBE_GROWTH,
    PROBE_SHARE,
    REACH_STEP_MS,
    AdaptiveState,
    Answer,
    read_states,
)
from throttle.cli import main
from throttle.keys import adaptive_fields, overrides_key
from throttle.monitor.exporter import gauges
from throttle.monitor.snapshot import read_snapshot
from throttle.monitor.status_tables import adaptive_lines
from throttle.overrides import parse_limits, reset_override, set_override

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
DOCUMENT: dict[str, Any] = (
    {
        "defaults": {"slot_margin": "0ms", "max_delay": "1m"},
        "pools": {"llm": {"limits": ["100/10s"], "shares": {"high": 1.0, "low": 0.5},
                          "adaptive": True}},
        "tools": {
            "plain": {"limits": ["10/10s"], "adaptive": True},
            "fixed": {"limits": ["10/10s"]},
            "high": {"limits": ["1000/10s"], "pool": "llm", "priority": "high"},
            "low": {"limits": ["1000/10s"], "pool": "llm", "priority": "low"},
        },
    }
)
CONFIG = load_config(DOCUMENT)
OPENAI = {"x-ratelimit-limit-requests": "6", "x-ratelimit-remaining-requests": "5",
          "x-ratelimit-reset-requests": "1s"}


def _admitted(gate: Gate, tool: str, count: int, at_s: float, tag: str) -> int:
    """How many of `count` new calls at `at_s` are admitted at once (others released)."""
    admitted = 0
    for i in range(count):
        decision = gate.acquire(tool, f"{tag}-{i}", now_s=at_s)
        admitted += decision.action is Action.ADMIT
        if decision.action is Action.DELAY:
            gate.release(tool, f"{tag}-{i}")
    return admitted


def test_a_reported_limit_lowers_the_effective_limit_from_the_next_decision(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 1, P, "a") == 1
    [state] = gate.adapter.report("plain", [Answer(OPENAI, 200)], now_s=P)
    assert (state.configured, state.effective) == (10, 6)
    assert state.reason == "headers: limit 6"
    # 1 admitted, the window now holds 6: five more, not nine.
    assert _admitted(gate, "plain", 9, P + 1, "b") == 5


def test_less_remaining_than_the_gate_counts_lowers_it_at_once(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 2, P, "a") == 2
    # The gate thinks 8 remain; the upstream (shared with someone else) says 3.
    answer = Answer({"x-ratelimit-remaining-requests": "3"}, 200)
    [state] = gate.adapter.report("plain", [answer], now_s=P)
    assert state.effective == 5 and state.reason == "headers: remaining 3 < 8"
    assert _admitted(gate, "plain", 9, P + 1, "b") == 3


def test_a_higher_report_raises_it_back_but_never_above_the_configured_max(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    gate.adapter.report("plain", [Answer(OPENAI, 200)], now_s=P)
    more = {"x-ratelimit-limit-requests": "50", "x-ratelimit-remaining-requests": "50"}
    [state] = gate.adapter.report("plain", [Answer(more, 200)], now_s=P + 1)
    assert (state.effective, state.reason) == (10, "raised")
    assert _admitted(gate, "plain", 12, P + 2, "a") == 10


def test_an_override_caps_it_and_is_left_in_place(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    set_override(gate.client, CONFIG, prefix, parse_limits(["4/10s"]), tool="plain")
    [state] = gate.adapter.report("plain", [Answer(OPENAI, 200)], now_s=P)
    assert (state.configured, state.effective) == (4, 4)  # the upstream's 6 is above it
    assert _admitted(gate, "plain", 9, P, "a") == 4
    # The override is the operator's: reset, the learned 6 stands alone.
    assert reset_override(gate.client, CONFIG, prefix, tool="plain")
    gate.adapter.report("plain", [Answer(OPENAI, 200)], now_s=P + 20)
    assert _admitted(gate, "plain", 9, P + 20, "b") == 6


def test_a_429_without_headers_cuts_below_where_it_came_then_it_climbs_back_and_probes(
    redis_url: str, prefix: str
) -> None:
    assert (BACKOFF, APPROACH_WINDOWS, PROBE_SHARE, PROBE_GROWTH) == (0.1, 1, 0.05, 3)
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 8, P, "a") == 8
    # Refused with 8 in the window: the upstream's level is 8, the limit goes 10% under it.
    [cut] = gate.adapter.report("plain", [], busy=True, now_s=P)
    assert (cut.effective, cut.reason) == (pytest.approx(7.2), "429")
    # Another 429 of the same overshoot (within a window) does not cut again.
    [same] = gate.adapter.report("plain", [Answer({}, 429)], now_s=P + 3)
    assert same.effective == pytest.approx(7.2)
    # Answers bring it back to the level over a window, slowly near it ...
    [near] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 5)
    assert near.effective == pytest.approx(8 * (1 - 0.1 / 8))
    [level] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 10)
    assert (level.effective, level.reason) == (pytest.approx(8), "raised")
    # ... then probe above it: 5%, then each window's step 3 times the last.
    [probe] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 20)
    assert probe.effective == pytest.approx(8.4)
    assert _admitted(gate, "plain", 10, P + 20, "b") == 8
    # The probe is refused with 8 in the window: back under 8 again, not under 8.4.
    [again] = gate.adapter.report("plain", [], busy=True, now_s=P + 20)
    assert again.effective == pytest.approx(7.2)
    [up] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 50)
    assert up.effective == pytest.approx(8 * 1.2)
    [found] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 60)
    assert found.effective == 10  # a higher upstream limit is found: 8 x 1.65, capped


def test_later_429s_of_the_same_overshoot_refine_the_level_without_cutting_again(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 9, P, "a") == 9
    [cut] = gate.adapter.report("plain", [], busy=True, now_s=P)
    assert cut.effective == pytest.approx(8.1)
    # Two more calls of the burst are refused; the cooldown takes each out of the log.
    for member in ("a-7", "a-8"):
        gate.cool_down("plain", 0.001, member=member, now_s=P + 0.1)
        [state] = gate.adapter.report("plain", [], busy=True, now_s=P + 0.1)
    assert (state.effective, state.reason) == (pytest.approx(6.3), "429")  # 0.9 x 7


def test_a_probe_step_holds_through_its_window(redis_url: str, prefix: str) -> None:
    """Calls that come late in a window of probing (a slow burst) meet the same step as
    those at its start, not a larger one: two calls over the upstream's limit were refused
    at once when the step grew with time."""
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 8, P, "a") == 8
    gate.adapter.report("plain", [], busy=True, now_s=P)  # level 8
    [start] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 20)
    [late] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 29.5)
    assert start.effective == late.effective == pytest.approx(8 * 1.05)
    [next_window] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 30)
    assert next_window.effective == pytest.approx(8 * 1.2)


def _turn_of_window_race(gate: Gate) -> AdaptiveState:
    """Level 8 learned and served; then a 429 as the window turns over (the upstream still
    counts 2 calls of the last window, the gate 6): its state."""
    assert _admitted(gate, "plain", 9, P, "a") == 9
    gate.adapter.report("plain", [], busy=True, now_s=P)  # level 9
    [level] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 10)
    assert level.effective == pytest.approx(9)
    # The next window: 8 calls (2 at P + 10.5, 6 at P + 10.6), all served.
    assert _admitted(gate, "plain", 2, P + 10.5, "b") == 2
    assert _admitted(gate, "plain", 6, P + 10.6, "c") == 6
    for member in ["b-0", "b-1", *(f"c-{i}" for i in range(6))]:
        gate.adapter.report("plain", [Answer({}, 200)], member=member, now_s=P + 10.65)
    # A window later the gate has let the first 2 go, the upstream (they arrived late) not
    # yet: it refuses the next call with 6 in the gate's count. Its limit did not fall.
    assert _admitted(gate, "plain", 1, P + 20.55, "d") == 1
    gate.cool_down("plain", 0.001, member="d-0", now_s=P + 20.55)
    [race] = gate.adapter.report("plain", [], busy=True, now_s=P + 20.55)
    return race


def test_a_429_as_the_window_turns_over_keeps_the_level_the_upstream_served(
    redis_url: str, prefix: str
) -> None:
    """A call of the last window that reached the upstream late is still counted there when
    the gate has let it go: a 429 then finds the gate's use under the upstream's limit. The
    level stays what the upstream served lately; a lower limit is learned a cut later."""
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    race = _turn_of_window_race(gate)
    assert (race.effective, race.reason) == (pytest.approx(0.9 * 8), "429")
    # Had it fallen (to 5), the answers after the cut serve 5 and the next 429 learns it.
    assert _admitted(gate, "plain", 5, P + 40, "e") == 5
    gate.adapter.report("plain", [Answer({}, 200)], member="e-4", now_s=P + 40)
    assert _admitted(gate, "plain", 1, P + 40, "f") == 1
    gate.cool_down("plain", 0.001, member="f-0", now_s=P + 40)
    [low] = gate.adapter.report("plain", [], busy=True, now_s=P + 40)
    assert low.effective == pytest.approx(0.9 * 5)


def test_a_429_as_the_window_turns_over_makes_the_learned_windows_reach_further(
    redis_url: str, prefix: str
) -> None:
    """Calls reach the upstream later than the gate allows for: the learned limit's windows
    grow by REACH_STEP_MS, so its slots are let go that much later."""
    assert REACH_STEP_MS == 25
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    _turn_of_window_race(gate)
    [back] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 30.55)
    assert back.effective == pytest.approx(8)
    assert _admitted(gate, "plain", 9, P + 31, "e") == 8
    # 10 s after them the gate's own window has let them go; the learned one holds them
    # 25 ms longer.
    assert _admitted(gate, "plain", 1, P + 41.01, "f") == 0
    # A probe's 429 (at the use served) takes back a quarter step: 19 ms (whole ms, as
    # acquire.lua takes windows).
    gate.adapter.report("plain", [Answer({}, 200)], member="e-7", now_s=P + 41.015)
    [probe] = gate.adapter.report("plain", [], busy=True, now_s=P + 41.02)
    assert probe.effective == pytest.approx(0.9 * 8)
    assert _admitted(gate, "plain", 1, P + 41.021, "g") == 1  # 25 ms would hold e-* still


def test_what_was_served_does_not_count_the_calls_still_on_their_way(
    redis_url: str, prefix: str
) -> None:
    """A served call's answer counts the calls admitted up to it, not those after it: they
    may still be on their way to a refusal (the level would stay over the upstream's)."""
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert _admitted(gate, "plain", 9, P, "a") == 9
    gate.adapter.report("plain", [], busy=True, now_s=P)  # level 9
    [probe] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 20)
    assert probe.effective == pytest.approx(9 * 1.05)
    # The upstream's limit is now 8: of 9 calls, the 9th will be refused. The 8th is
    # answered first, while the 9th is on its way.
    for i in range(9):
        assert _admitted(gate, "plain", 1, P + 20 + 0.01 * i, f"b{i}") == 1
    gate.adapter.report("plain", [Answer({}, 200)], member="b7-0", now_s=P + 20.1)
    gate.cool_down("plain", 0.001, member="b8-0", now_s=P + 20.12)
    [cut] = gate.adapter.report("plain", [], busy=True, now_s=P + 20.12)
    assert (cut.effective, cut.reason) == (pytest.approx(0.9 * 8), "429")


def test_a_steady_upstream_keeps_the_effective_limit_and_its_why_still(
    redis_url: str, prefix: str
) -> None:
    """The upstream (limit 6) counts a call on arrival, after the gate admitted it: a call
    that arrived late is still in its window for a moment after it left the gate's. The
    gate counts its own window half a slot margin longer (as it checks admissions)."""
    config = load_config({"tools": {"plain": {"limits": ["10/10s"], "adaptive": True,
                                              "slot_margin": "400ms", "max_delay": "1m"}}})
    gate = Gate(redis_url, config, prefix=prefix)
    arrivals: list[float] = []
    seen = []
    for i in range(20):  # one call every 2 s for four windows; every other window's first
        at = P + 2 * i     # arrives late, still counted there when the next window's arrives
        assert _admitted(gate, "plain", 1, at, f"c{i}") == 1
        arrivals.append(at + (0.15 if i % 10 == 0 else 0.02))
        answered = at + 0.05
        if arrivals[-1] > answered:
            answered = arrivals[-1] + 0.01
        held = sum(1 for a in arrivals if answered - 10 < a <= answered)
        headers = {"x-ratelimit-limit-requests": "6",
                   "x-ratelimit-remaining-requests": str(6 - held)}
        [state] = gate.adapter.report("plain", [Answer(headers, 200)], now_s=answered)
        seen.append((state.effective, state.reason))
    assert set(seen) == {(6, "headers: limit 6")}, seen


def test_after_a_real_shortfall_it_stays_lowered_until_the_upstreams_reset(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    six = {"x-ratelimit-limit-requests": "6", "x-ratelimit-remaining-requests": "6"}
    gate.adapter.report("plain", [Answer(six, 200)], now_s=P)
    assert _admitted(gate, "plain", 1, P, "a") == 1
    # Someone else took 3 of the upstream's 6: it says 2 remain where the gate counts 5.
    short = {"x-ratelimit-limit-requests": "6", "x-ratelimit-remaining-requests": "2"}
    [low] = gate.adapter.report("plain", [Answer(short, 200)], now_s=P + 1)
    assert (low.effective, low.reason) == (3, "headers: remaining 2 < 5")
    # Answers that no longer say so do not raise it within the window ...
    [kept] = gate.adapter.report("plain", [Answer(six, 200)], now_s=P + 9)
    assert (kept.effective, kept.reason) == (3, "headers: remaining 2 < 5")
    # ... after it they do, unless the upstream reports a higher limit than it did then.
    [back] = gate.adapter.report("plain", [Answer(six, 200)], now_s=P + 11.5)
    assert (back.effective, back.reason) == (6, "headers: limit 6")
    # When the upstream says when room comes back, it holds until then.
    soon = {**short, "x-ratelimit-reset-requests": "2s"}
    [low] = gate.adapter.report("plain", [Answer(soon, 200)], now_s=P + 20)
    assert (low.effective, low.reason) == (2, "headers: remaining 2 < 6")
    [kept] = gate.adapter.report("plain", [Answer(six, 200)], now_s=P + 21.9)
    assert kept.effective == 2
    [back] = gate.adapter.report("plain", [Answer(six, 200)], now_s=P + 22.1)
    assert back.effective == 6


def test_a_pool_learns_one_limit_shared_by_its_classes(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    headers = {"x-ratelimit-limit-requests": "40", "x-ratelimit-remaining-requests": "40"}
    [state] = gate.adapter.report("high", [Answer(headers, 200)], now_s=P)
    assert (state.target, state.effective) == ("pool llm", 40)
    assert _admitted(gate, "low", 30, P, "l") == 20  # its half of 40
    assert _admitted(gate, "high", 30, P, "h") == 20  # the rest of 40
    states = read_states(gate.client, CONFIG, prefix, now_s=P)
    [shown] = [s for s in states if s.target == "pool llm"]
    assert (shown.configured, shown.effective, shown.reason) == (100, 40, "headers: limit 40")


def test_a_learned_limit_lapses_when_the_upstream_stops_confirming_it(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    gate.adapter.report("plain", [Answer(OPENAI, 200)], now_s=P)
    assert _admitted(gate, "plain", 9, P + 100, "a") == 9  # 10 windows later: the file's 10


def test_a_tool_without_adaptive_ignores_reports(redis_url: str, prefix: str) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    assert gate.adapter.report("fixed", [Answer(OPENAI, 200)], now_s=P) == []
    assert _admitted(gate, "fixed", 12, P, "a") == 10


def test_status_and_the_exporter_show_configured_vs_effective_and_why(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    gate.adapter.report("plain", [Answer({"x-ratelimit-limit-requests": "6"}, 200)])
    snapshot = read_snapshot(gate.client, CONFIG, prefix)
    lines = [line.plain for line in adaptive_lines(snapshot)]
    assert any(line.startswith("adaptive tool plain: effective 6/10s of configured 10/10s "
                               "(last moved") and line.endswith(": headers: limit 6)")
               for line in lines), lines
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in gauges(snapshot) for s in family.samples
               if s.name.startswith("throttle_adaptive")}
    assert samples[("throttle_adaptive_limit", (("kind", "effective"), ("target", "tool plain"),
                                                ("window", "10s")))] == 6
    assert samples[("throttle_adaptive_limit", (("kind", "configured"), ("target", "pool llm"),
                                                ("window", "10s")))] == 100


def test_limits_reset_adaptive_forgets_a_learned_limit_at_once(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    gate.adapter.report("plain", [Answer(OPENAI, 200)], now_s=P)
    gate.adapter.report("high", [Answer({"x-ratelimit-limit-requests": "40"}, 200)], now_s=P)
    where = ["--redis-url", redis_url, "--prefix", prefix,
             "--config", str(write_config(DOCUMENT, tmp_path / "tools.toml"))]

    def reset(*args: str) -> Any:
        return CliRunner().invoke(main, ["limits", "reset", *args, "--adaptive", *where])

    done = reset("plain")
    assert (done.exit_code, done.output) == (0, "tool plain: learned limit forgotten\n")
    assert _admitted(gate, "plain", 12, P + 1, "a") == 10  # the file's 10 at once, not 6
    assert reset("plain").output == "tool plain: had no learned limit\n"
    assert reset("--pool", "llm").output == "pool llm: learned limit forgotten\n"
    assert _admitted(gate, "high", 120, P + 1, "h") == 100
    refused = reset("fixed")
    assert refused.exit_code == 1
    assert ("tool fixed has no adaptive limit (adaptive: pool llm, tool plain); name a tool "
            "or --pool with `adaptive = true`") in refused.output


def test_a_learned_window_of_fractional_milliseconds_still_decides(
    redis_url: str, prefix: str
) -> None:
    """acquire.lua's key TTLs come from the windows it reads: a learned window of 10 s and
    half a millisecond (a reach that was not whole) once made every call's PEXPIRE fail."""
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    learned, _ = adaptive_fields("tool:plain")
    gate.client.hset(overrides_key(prefix, CONFIG.tool("plain")), learned,
                     f"{(P + 60) * 1000:.0f} 3 10000.5")  # until, then max and window
    assert _admitted(gate, "plain", 5, P, "a") == 3
