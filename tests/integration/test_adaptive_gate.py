"""Adaptive limits on the real Redis gate (pinned clock): what the upstream reports lowers the
effective limit that acquire.lua enforces in the same call, an operator's override stays and
caps it, 429s without headers drive it down and answers raise it back (AIMD)."""

from __future__ import annotations

import pytest

from throttle import Action, Gate, load_config
from throttle.adaptive import (
    DECREASE,
    INCREASE_PER_WINDOW,
    Answer,
    read_states,
)
from throttle.monitor.exporter import gauges
from throttle.monitor.snapshot import read_snapshot
from throttle.monitor.status_tables import adaptive_lines
from throttle.overrides import parse_limits, reset_override, set_override

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
CONFIG = load_config(
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


def test_429s_without_headers_decrease_it_once_per_hold_then_answers_raise_it(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    [cut] = gate.adapter.report("plain", [], busy=True, now_s=P)
    assert (cut.effective, cut.reason) == (10 * DECREASE, "429")
    # A second 429 of the same burst (within the hold) does not cut again.
    [same] = gate.adapter.report("plain", [Answer({}, 429)], now_s=P + 0.5)
    assert same.effective == 10 * DECREASE
    [again] = gate.adapter.report("plain", [Answer({}, 429)], now_s=P + 2)
    assert again.effective == pytest.approx(10 * DECREASE**2)
    # Answers without a 429: +INCREASE_PER_WINDOW x 10 per 10 s window.
    [up] = gate.adapter.report("plain", [Answer({}, 200)], now_s=P + 12)
    assert up.effective == pytest.approx(10 * DECREASE**2 + 10 * INCREASE_PER_WINDOW)
    assert up.reason == "raised"
    assert _admitted(gate, "plain", 9, P + 12, "a") == int(up.effective)


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
