"""Property tests of the gate on the real Redis with a pinned clock (`now_s`).

Hypothesis draws limit sets, costs, arrival schedules, deadlines and lateness; the simulation
replays them in time order: every arrival calls `acquire`, every DELAY comes back at its slot
(plus its lateness) with the same member until it is admitted or falls back. Checked on every
example: no window of any limit ever holds more than `max` admitted units (half-open); new
arrivals get non-decreasing slots (FIFO); no DELAY waits past the call's deadline; FALLBACK
happens only when the earliest slot lies past the deadline (or the cost alone exceeds a limit);
and, for one limit, the log stays within its memory bound. Each decision is also compared with
the slot that the documented rule gives (earliest slot >= max(now, latest taken) that breaks no
window; with a slot margin m, windows of W + m/2 for admissions and W + m for reservations),
computed here from a snapshot of the log taken just before the call.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from throttle import Action, Decision, Gate, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

BASE_MS = 1_700_000_000_000
TOLERANCE_MS = 1e-3
TOOL = "sim"


@dataclass(frozen=True)
class Arrival:
    gap_ms: int
    cost: int
    lateness_ms: int
    deadline_ms: int | None


@dataclass(frozen=True)
class Scenario:
    limits: tuple[tuple[int, int], ...]  # (max, window_ms)
    max_delay_ms: int
    pace: str
    late: bool  # whether DELAYed calls come back after their slot (by their lateness_ms)
    margin_ms: int | None  # the tool's slot_margin; None leaves the default
    arrivals: tuple[Arrival, ...]


@dataclass
class Call:
    arrival_ms: int
    deadline_ms: int  # the absolute time by which the call must have run
    cost: int
    lateness_ms: int
    decisions: list[Decision] = field(default_factory=list)


limit_sets = st.lists(
    st.tuples(
        st.one_of(st.integers(1, 4), st.integers(1, 20)),
        st.one_of(st.integers(1, 10), st.integers(1, 120)).map(lambda s: s * 1000),
    ),
    min_size=1,
    max_size=3,
)
arrivals = st.builds(
    Arrival,
    gap_ms=st.one_of(st.just(0), st.integers(0, 3_000), st.integers(0, 150_000)),
    cost=st.one_of(st.just(1), st.integers(1, 5)),
    lateness_ms=st.one_of(st.integers(0, 2_000), st.integers(-1_000, 2_000)),
    deadline_ms=st.one_of(st.none(), st.none(), st.integers(0, 300_000)),
)
scenarios = st.builds(
    Scenario,
    limits=limit_sets.map(tuple),
    max_delay_ms=st.one_of(st.integers(1, 300_000), st.integers(1, 5).map(lambda n: n * 60_000)),
    pace=st.sampled_from(["earliest", "even"]),
    late=st.booleans(),
    margin_ms=st.one_of(st.none(), st.just(0), st.integers(1, 2_000)),
    arrivals=st.lists(arrivals, min_size=2, max_size=40).map(tuple),
).map(lambda scenario: scenario if scenario.margin_ms is None else dataclasses.replace(
    # A config refuses a margin that is not shorter than the shortest window.
    scenario, margin_ms=min(scenario.margin_ms, min(w for _, w in scenario.limits) - 1)))


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete this example's keys (never FLUSHDB: the server is shared)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def snapshot(
    client: redis.Redis, prefix: str, costs: dict[str, int]
) -> list[tuple[float, int, str]]:
    """The log as (score_ms, units, member), oldest first."""
    log = client.zrange(tool_keys(prefix, TOOL).log, 0, -1, withscores=True)
    return [(score, costs[member.decode()], member.decode()) for member, score in log]


def first_fit(
    log: list[tuple[float, int, str]], start: float, cost: int, limits: list[tuple[int, float]]
) -> float:
    """The earliest t >= start at which every window (t - W, ...] of `log` leaves room for cost."""
    candidates = sorted({start} | {score + window for score, _, _ in log for _, window in limits})
    return next(
        t
        for t in candidates
        if t >= start
        and all(
            sum(units for score, units, _ in log if score > t - window) + cost <= most
            for most, window in limits
        )
    )


LATE_GRACE_MS = 1000.0


def expected_new_slot_ms(
    log: list[tuple[float, int, str]], now: float, cost: int, scenario: Scenario, margin: int
) -> float | None:
    """The documented slot of a new call: earliest t >= max(now, latest) breaking no window.

    With a slot margin m, windows are checked as W + m/2, and a call that must wait is placed
    with windows of W + m (see the ARGV header of acquire.lua).
    """
    longest = max(window for _, window in scenario.limits) + margin
    log = [entry for entry in log if entry[0] > now - longest]
    if any(cost > most for most, _ in scenario.limits):
        return None
    start = max([now] + [score for score, _, _ in log])
    slot = first_fit(log, start, cost, widened(scenario, margin / 2))
    if slot > now and margin > 0:
        slot = first_fit(log, start, cost, widened(scenario, margin))
    if slot > now and scenario.pace == "even" and log:
        gap = max(window / most for most, window in scenario.limits)
        slot = max(slot, max(score for score, _, _ in log) + gap)
    return slot


def expected_due_slot_ms(
    log: list[tuple[float, int, str]],
    now: float,
    member: str,
    cost: int,
    scenario: Scenario,
    margin: int,
) -> float:
    """When a due reservation fits the trailing windows (entries at or before now)."""
    longest = max(window for _, window in scenario.limits) + margin
    log = [entry for entry in log if now - longest < entry[0] <= now and entry[2] != member]
    return first_fit(log, now, cost, widened(scenario, margin / 2))


def widened(scenario: Scenario, extra_ms: float) -> list[tuple[int, float]]:
    return [(most, window + extra_ms) for most, window in scenario.limits]


def config_for(scenario: Scenario) -> dict[str, object]:
    limits = [f"{most}/{window}ms" for most, window in scenario.limits]
    tool = {"limits": limits, "max_delay": f"{scenario.max_delay_ms}ms", "pace": scenario.pace}
    if scenario.margin_ms is not None:
        tool["slot_margin"] = f"{scenario.margin_ms}ms"
    return {"broker": {"visibility_timeout": "1h"}, "tools": {TOOL: tool}}


def assert_windows_hold(admissions: list[tuple[float, int]], scenario: Scenario) -> None:
    """Every half-open window [s, s + W) holds at most max admitted units."""
    admissions = sorted(admissions)
    for most, window in scenario.limits:
        for start, _ in admissions:
            used = sum(units for at, units in admissions if start <= at < start + window)
            assert used <= most, (most, window, start, admissions)


def memory_bound(scenario: Scenario, margin: int) -> int | None:
    """Entries one limit's log may hold: max x (1 + ceil((max_delay + margin) / window)).

    The log keeps what lies in (now - window - margin, now + max_delay], and every window holds
    at most max of it. DESIGN.md writes max x (1 + max_delay / window), which misses the rounding
    up and the margin; returns later than their slot can exceed even this (docs/gate.md's bound
    adds a window for them: test_gate_semantics.py, test_the_log_stays_within_the_documented_
    bound_when_calls_come_back_late), so it is checked for one limit and punctual returns only.
    """
    if len(scenario.limits) != 1 or scenario.late:
        return None
    most, window = scenario.limits[0]
    return most * (1 + math.ceil((scenario.max_delay_ms + margin) / window))


def simulate(client: redis.Redis, prefix: str, scenario: Scenario) -> None:
    config = load_config(config_for(scenario))
    margin = config.tool(TOOL).slot_margin_ms
    gate = Gate(client, config, prefix=prefix)
    calls: dict[str, Call] = {}
    costs: dict[str, int] = {}
    events: list[tuple[int, int, str]] = []
    clock = 0
    for index, arrival in enumerate(scenario.arrivals):
        clock += arrival.gap_ms
        member = f"m{index}"
        deadline = scenario.max_delay_ms
        if arrival.deadline_ms is not None:
            deadline = min(deadline, arrival.deadline_ms)
        lateness = arrival.lateness_ms if scenario.late else 0
        calls[member] = Call(clock, clock + deadline, arrival.cost, lateness)
        costs[member] = arrival.cost
        heapq.heappush(events, (clock, index, member))

    admissions: list[tuple[float, int]] = []
    new_slots: list[float] = []
    bounded = memory_bound(scenario, margin)
    longest = max(window for _, window in scenario.limits) + margin
    sequence = len(scenario.arrivals)
    steps = 0
    while events:
        steps += 1
        assert steps < 20_000, "the simulation does not converge"
        at, _, member = heapq.heappop(events)
        call = calls[member]
        now = BASE_MS + at
        first = not call.decisions
        remaining_ms = call.deadline_ms - at
        before = snapshot(client, prefix, costs)
        held = {m: score for score, _, m in before}.get(member)
        if held is not None and held <= now - longest:
            held = None  # so late that its reservation was trimmed: it comes back as a new call
        decision = gate.acquire(
            TOOL, member, cost=call.cost, deadline_s=remaining_ms / 1000, now_s=now / 1000
        )
        call.decisions.append(decision)
        event(f"{decision.action.value}: {decision.reason}")
        slot_ms = decision.slot_at * 1000
        # The deadline exactly as the gate computes it from deadline_s (negative once passed).
        effective_deadline_ms = min(scenario.max_delay_ms, remaining_ms / 1000 * 1000)
        grace_ms = 0.0

        if held is None:
            expected = expected_new_slot_ms(before, now, call.cost, scenario, margin)
            if expected is None:
                assert (decision.action, decision.reason) == (Action.FALLBACK, "cost_exceeds_limit")
                continue
            assert slot_ms == pytest.approx(max(expected, now), abs=TOLERANCE_MS), decision
            outcomes = ("admitted", "reserved")
        elif held > now:
            assert (decision.action, decision.reason) == (Action.DELAY, "early")
            assert slot_ms == pytest.approx(held, abs=TOLERANCE_MS)
            expected, outcomes = held, ("", "early")
        else:
            # Due reservations behind this one (later slots, not admitted yet) do not count:
            # they wait for the capacity after it.
            behind = {
                m for score, _, m in before
                if held < score <= now and calls[m].decisions[-1].action is Action.DELAY
            }
            ahead = [entry for entry in before if entry[2] not in behind]
            expected = expected_due_slot_ms(ahead, now, member, call.cost, scenario, margin)
            assert slot_ms == pytest.approx(expected, abs=TOLERANCE_MS), decision
            outcomes = ("reservation", "late")
            grace_ms = LATE_GRACE_MS  # a promised slot held up by lateness gets a grace
        if expected <= now and held is None and effective_deadline_ms < 0:
            assert (decision.action, decision.reason) == (Action.FALLBACK, "deadline")
            continue
        if expected <= now and held is not None and effective_deadline_ms + grace_ms < TOLERANCE_MS:
            # A due reservation that comes back after its deadline plus the grace falls back
            # even when the windows hold it: admitted now, it would run past its deadline.
            allowed = {(Action.FALLBACK, "deadline")}
            if effective_deadline_ms + grace_ms > -TOLERANCE_MS:  # on the boundary: either
                allowed.add((Action.ADMIT, outcomes[0]))
            assert (decision.action, decision.reason) in allowed, decision
        elif expected <= now:
            assert (decision.action, decision.reason) == (Action.ADMIT, outcomes[0])
        elif abs(expected - now - effective_deadline_ms - grace_ms) > TOLERANCE_MS:
            if expected - now > effective_deadline_ms + grace_ms:
                assert (decision.action, decision.reason) == (Action.FALLBACK, "deadline")
            else:
                assert (decision.action, decision.reason) == (Action.DELAY, outcomes[1])
        if first and decision.action is not Action.FALLBACK:
            new_slots.append(slot_ms)

        if decision.action is Action.FALLBACK:
            assert decision.reason == "cost_exceeds_limit" or slot_ms - now > effective_deadline_ms
        elif decision.action is Action.DELAY:
            assert decision.wait_s * 1000 <= effective_deadline_ms + grace_ms + TOLERANCE_MS
            assert slot_ms <= BASE_MS + call.deadline_ms + grace_ms + TOLERANCE_MS
            # Come back at the slot (the clock has whole milliseconds) plus the lateness; one
            # that came back early (and got 'early') comes back at the slot.
            back = math.ceil(slot_ms - BASE_MS - TOLERANCE_MS)
            if decision.reason != "early":
                back += call.lateness_ms
            sequence += 1
            heapq.heappush(events, (max(back, at + 1), sequence, member))
        else:
            assert slot_ms == pytest.approx(now, abs=TOLERANCE_MS)
            admissions.append((now, call.cost))

        if bounded is not None:
            assert client.zcard(tool_keys(prefix, TOOL).log) <= bounded

    assert new_slots == sorted(new_slots), "new arrivals keep arrival order"
    assert_windows_hold(admissions, scenario)
    for member, call in calls.items():
        last = call.decisions[-1].action
        assert last in (Action.ADMIT, Action.FALLBACK), (member, call.decisions)


def simulate_on_own_prefix(client: redis.Redis, scenario: Scenario) -> None:
    prefix = f"throttle-test-{uuid.uuid4().hex[:12]}"
    try:
        simulate(client, prefix, scenario)
    finally:
        delete_prefix(client, prefix)


@settings(
    max_examples=100,
    deadline=None,
    # Fixed examples in the normal run (the "fixed" profile in tests/conftest.py); `make
    # test-deep` runs random seeds. A case with limits 1/1s + 3/8s, pace "even" and late calls
    # found that the script cut slots to 3 decimals in its bounds; it now keeps them exact
    # (test_gate_semantics.py, test_a_due_call_with_a_fractional_slot_...).
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios)
@example(  # R1 is admitted 2 s late, so R2, due while R1 is in its window, gets 'late'
    scenario=Scenario(
        limits=((1, 10_000),),
        max_delay_ms=30_000,
        pace="earliest",
        late=True,
        margin_ms=0,
        arrivals=(
            Arrival(gap_ms=0, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=0, cost=1, lateness_ms=2_000, deadline_ms=None),
            Arrival(gap_ms=0, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=0, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=12_500, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=8_500, cost=1, lateness_ms=0, deadline_ms=5_000),
        ),
    )
)
@example(  # m3 back 1001 ms after its deadline: a free window, yet FALLBACK (grace 1 s)
    scenario=Scenario(
        limits=((1, 5_000),),
        max_delay_ms=7_337,
        pace="earliest",
        late=True,
        margin_ms=74,
        arrivals=(
            Arrival(gap_ms=0, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=0, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=0, cost=1, lateness_ms=0, deadline_ms=None),
            Arrival(gap_ms=2_811, cost=1, lateness_ms=1_001, deadline_ms=None),
        ),
    )
)
@example(  # weighted calls, two limits, even pace and a margin
    scenario=Scenario(
        limits=((5, 2_000), (7, 10_000)),
        max_delay_ms=20_000,
        pace="even",
        late=True,
        margin_ms=30,
        arrivals=tuple(
            Arrival(gap_ms=n % 3 * 100, cost=1 + n % 3, lateness_ms=n * 7 - 20, deadline_ms=None)
            for n in range(15)
        ),
    )
)
def test_random_schedules_never_exceed_a_window_and_keep_order_and_deadlines(
    client: redis.Redis, scenario: Scenario
) -> None:
    simulate_on_own_prefix(client, scenario)


# Windows wider than acquire.lua's FEW (32) entries read their use from the log's sum of units
# (units.lua) less the entries outside them: the same rule, checked on windows of many calls.
wide_scenarios = st.builds(
    Scenario,
    limits=st.lists(
        st.tuples(st.integers(40, 120), st.integers(2, 30).map(lambda s: s * 1000)),
        min_size=1,
        max_size=2,
    ).map(tuple),
    max_delay_ms=st.integers(1_000, 60_000),
    pace=st.sampled_from(["earliest", "even"]),
    late=st.booleans(),
    margin_ms=st.one_of(st.none(), st.just(0), st.integers(1, 500)),
    arrivals=st.lists(
        st.builds(
            Arrival,
            gap_ms=st.one_of(st.just(0), st.integers(0, 300), st.integers(0, 3_000)),
            cost=st.one_of(st.just(1), st.integers(1, 5)),
            lateness_ms=st.integers(0, 500),
            deadline_ms=st.none(),
        ),
        min_size=40,
        max_size=90,
    ).map(tuple),
)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=wide_scenarios)
@example(  # 80 weighted calls in one burst on 60/10s: the window holds 30-60 entries
    scenario=Scenario(
        limits=((60, 10_000),),
        max_delay_ms=60_000,
        pace="earliest",
        late=True,
        margin_ms=100,
        arrivals=tuple(
            Arrival(gap_ms=n % 4 * 50, cost=1 + n % 3 // 2, lateness_ms=n * 5 % 300,
                    deadline_ms=None)
            for n in range(80)
        ),
    )
)
def test_wide_weighted_windows_follow_the_same_rule(
    client: redis.Redis, scenario: Scenario
) -> None:
    simulate_on_own_prefix(client, scenario)
