"""Fair sharing (`fair_by`) on the real Redis with a pinned clock (`now_s`).

Hypothesis draws tenants, weights, bursts, costs, horizons and deadlines; the simulation
replays them in time order: every arrival calls `acquire` with its tenant, every DELAY
(a reservation or a parked estimate) comes back at its slot with the same member until it is
admitted or falls back. Checked on every example (docs/gate.md, "Fair sharing"):
1. no window of the limit ever holds more than `max` admitted units;
2. work-conserving: the same arrivals without `fair_by` (FIFO) finish no later than the fair
   run, give or take one window;
3. a call waits at most the horizon twice, a window, and the fair-share time of the units
   its own tenant had waiting (scaled by every tenant's weight over its own);
4. every call ends: admitted or its fallback, no DELAY past its deadline, parked calls never
   come back sooner than 50 ms;
5. the fair keys hold one entry per waiting call and per tenant at most, and expire.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from throttle import Action, AsyncGate, Gate, load_config
from throttle.errors import InvalidToolCall
from throttle.fairness import reset_live_weight, set_live_weight
from throttle.keys import fair_keys, tool_keys

pytestmark = pytest.mark.redis

BASE_MS = 1_700_000_000_000
TOOL = "shared"
FAIR_MIN_WAIT_MS = 50
LATE_GRACE_MS = 1000


@dataclass(frozen=True)
class Burst:
    tenant: int
    at_ms: int
    count: int
    cost: int


@dataclass(frozen=True)
class Scenario:
    max: int
    window_ms: int
    horizon_ms: int | None  # None: the default (half the window)
    weights: tuple[int, ...]  # per tenant
    max_delay_ms: int
    bursts: tuple[Burst, ...]


@dataclass
class Call:
    tenant: int
    arrival_ms: int
    cost: int
    deadline_ms: int
    actions: list[tuple[Action, str, float]] = field(default_factory=list)
    admitted_ms: float | None = None


@dataclass
class Run:
    calls: dict[str, Call]
    admissions: list[tuple[float, int]]  # (ms, units)
    max_queue: int = 0
    max_tenants: int = 0


def scenarios(max_delay: st.SearchStrategy[int]) -> st.SearchStrategy[Scenario]:
    @st.composite
    def build(draw: st.DrawFn) -> Scenario:
        tenants = draw(st.integers(2, 5))
        bursts = draw(st.lists(st.builds(
            Burst, tenant=st.integers(0, tenants - 1), at_ms=st.integers(0, 3_000),
            count=st.one_of(st.integers(1, 4), st.integers(10, 40)),
            cost=st.one_of(st.just(1), st.integers(1, 3)),
        ), min_size=1, max_size=6))
        window = draw(st.sampled_from([500, 1000, 2000]))
        return Scenario(
            max=draw(st.integers(3, 10)), window_ms=window,
            horizon_ms=draw(st.one_of(st.none(), st.integers(50, 2 * window))),
            weights=tuple(draw(st.lists(st.integers(1, 3), min_size=tenants,
                                        max_size=tenants))),
            max_delay_ms=draw(max_delay), bursts=tuple(bursts),
        )
    return build()


def config_for(scenario: Scenario, fair: bool) -> dict[str, object]:
    tool: dict[str, object] = {
        "limits": [f"{scenario.max}/{scenario.window_ms}ms"],
        "max_delay": f"{scenario.max_delay_ms}ms",
        "params": {"type": "object", "properties": {"tenant": {"type": "string"}},
                   "required": ["tenant"]},
    }
    if fair:
        tool["fair_by"] = "tenant"
        tool["fair_weights"] = {f"t{i}": w for i, w in enumerate(scenario.weights)}
        if scenario.horizon_ms is not None:
            tool["fair_horizon"] = f"{scenario.horizon_ms}ms"
    return {"broker": {"visibility_timeout": "2h"}, "tools": {TOOL: tool}}


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def simulate(client: redis.Redis, prefix: str, scenario: Scenario, fair: bool) -> Run:
    gate = Gate(client, load_config(config_for(scenario, fair)), prefix=prefix)
    finish, queue = fair_keys(tool_keys(prefix, TOOL), None, prefix)[:2]
    calls: dict[str, Call] = {}
    events: list[tuple[float, int, str]] = []
    for b, burst in enumerate(scenario.bursts):
        for i in range(burst.count):
            member = f"b{b}-{i}"
            calls[member] = Call(burst.tenant, burst.at_ms, burst.cost,
                                 burst.at_ms + scenario.max_delay_ms)
            heapq.heappush(events, (burst.at_ms, len(calls), member))
    run = Run(calls, [])
    sequence = len(calls)
    while events:
        at, _, member = heapq.heappop(events)
        call = calls[member]
        decision = gate.acquire(
            TOOL, member, cost=call.cost, fair_key=f"t{call.tenant}",
            deadline_s=(call.deadline_ms - at) / 1000, now_s=(BASE_MS + at) / 1000)
        slot = decision.slot_at * 1000 - BASE_MS
        call.actions.append((decision.action, decision.reason, slot))
        assert len(call.actions) < 200, ("the call does not settle", call)
        if decision.action is Action.ADMIT:
            call.admitted_ms = at
            run.admissions.append((at, call.cost))
        elif decision.action is Action.DELAY:
            assert slot <= call.deadline_ms + LATE_GRACE_MS + 1e-3, (decision, call)
            if decision.reason == "parked":
                assert decision.wait_s * 1000 >= FAIR_MIN_WAIT_MS - 1e-3
            sequence += 1
            heapq.heappush(events, (max(math.ceil(slot - 1e-3), at + 1), sequence, member))
        else:
            assert decision.reason in ("deadline", "cost_exceeds_limit"), decision
        if fair:
            waiting = [c for c in calls.values() if c.arrival_ms <= at and c.actions
                       and c.actions[-1][0] is Action.DELAY]
            queued = client.zcard(queue)
            assert queued <= len(waiting)
            assert client.zcard(finish) <= len(scenario.weights)
            run.max_queue = max(run.max_queue, queued)
    return run


def assert_windows_hold(admissions: list[tuple[float, int]], scenario: Scenario) -> None:
    admissions = sorted(admissions)
    for start, _ in admissions:
        used = sum(units for at, units in admissions
                   if start <= at < start + scenario.window_ms)
        assert used <= scenario.max, (start, admissions)


def assert_keys_bounded(client: redis.Redis, prefix: str, scenario: Scenario) -> None:
    """Every fair key expires; after the grace, one more call leaves nothing waiting."""
    names = fair_keys(tool_keys(prefix, TOOL), None, prefix)
    for name in names:
        assert client.exists(name) == 0 or client.pttl(name) > 0, name
    gate = Gate(client, load_config(config_for(scenario, True)), prefix=prefix)
    later = BASE_MS + 10 * 3_600_000
    gate.acquire(TOOL, "after", fair_key="t0", now_s=later / 1000)
    finish, queue, parked = names[:3]
    assert client.zcard(queue) == client.zcard(parked) == 0
    assert client.zcard(finish) <= 1


def packing(scenario: Scenario) -> float:
    """How much longer a unit may take when a window cannot give its last units to the next
    call (the largest cost - 1 of them at most)."""
    largest = max(burst.cost for burst in scenario.bursts)
    return scenario.max / (scenario.max - largest + 1)


def fair_bound_ms(scenario: Scenario, call: Call, calls: dict[str, Call], margin: int) -> float:
    """The most `call` may wait: two horizons, a window, and the fair share of its tenant's
    waiting units (every tenant's weight over its own), plus a call of each tenant; a unit
    takes window / max, or longer when costs leave units of a window unused (`packing`)."""
    unit = (scenario.window_ms + margin) / scenario.max * packing(scenario)
    horizon = (scenario.horizon_ms or scenario.window_ms / 2) + margin
    own = sum(c.cost for c in calls.values() if c.tenant == call.tenant
              and c.arrival_ms <= call.arrival_ms
              and (c.admitted_ms is None or c.admitted_ms >= call.arrival_ms))
    weights = scenario.weights
    share = own / weights[call.tenant] * sum(weights) + 3 * len(weights)
    return 2 * horizon + scenario.window_ms + margin + share * unit + FAIR_MIN_WAIT_MS


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(st.just(3_600_000)))
def test_tenants_share_a_limit_exactly_fairly_and_without_idling(
    client: redis.Redis, scenario: Scenario
) -> None:
    prefix = f"fair-{uuid.uuid4().hex[:8]}"
    try:
        fair = simulate(client, prefix, scenario, fair=True)
        assert_keys_bounded(client, prefix, scenario)
        fifo = simulate(client, prefix + "x", scenario, fair=False)
    finally:
        delete_prefix(client, prefix)
        delete_prefix(client, prefix + "x")
    margin = load_config(config_for(scenario, True)).tool(TOOL).slot_margin_ms
    assert_windows_hold(fair.admissions, scenario)
    for member, call in fair.calls.items():
        assert call.admitted_ms is not None, (member, call)
        waited = call.admitted_ms - call.arrival_ms
        assert waited <= fair_bound_ms(scenario, call, fair.calls, margin), (member, call)
    # Work-conserving: the fair order finishes the same work no later than FIFO, give or
    # take one window (and a parked call's shortest wait). Mixed costs interleaved pack
    # less tightly than FIFO's runs of equal costs: a window may keep up to (largest cost
    # - 1) units it cannot give to the next call in order (docs/gate.md, "Fair sharing").
    assert sum(u for _, u in fair.admissions) == sum(u for _, u in fifo.admissions)
    fair_end = max(at for at, _ in fair.admissions)
    fifo_end = max(at for at, _ in fifo.admissions)
    assert fair_end <= ((fifo_end + scenario.window_ms) * packing(scenario) + margin
                        + FAIR_MIN_WAIT_MS)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(st.integers(100, 8_000)))
def test_every_fair_call_ends_by_its_deadline(client: redis.Redis, scenario: Scenario) -> None:
    prefix = f"fair-{uuid.uuid4().hex[:8]}"
    try:
        run = simulate(client, prefix, scenario, fair=True)
        assert_keys_bounded(client, prefix, scenario)
    finally:
        delete_prefix(client, prefix)
    assert_windows_hold(run.admissions, scenario)
    for member, call in run.calls.items():
        action, _, _ = call.actions[-1]
        assert action in (Action.ADMIT, Action.FALLBACK), (member, call)
        if call.admitted_ms is not None:
            assert call.admitted_ms <= call.deadline_ms + LATE_GRACE_MS, (member, call)


def test_a_flood_of_distinct_tenants_leaves_one_entry_per_waiting_call(
    client: redis.Redis,
) -> None:
    scenario = Scenario(5, 1000, None, (1,), 60_000, ())
    prefix = f"fair-{uuid.uuid4().hex[:8]}"
    gate = Gate(client, load_config(config_for(scenario, True)), prefix=prefix)
    finish, queue, parked = fair_keys(tool_keys(prefix, TOOL), None, prefix)[:3]
    try:
        answers = [gate.acquire(TOOL, f"m{i}", fair_key=f"tenant-{i}", now_s=BASE_MS / 1000)
                   for i in range(300)]
        waiting = sum(a.reason == "parked" for a in answers)
        assert waiting > 250
        assert client.zcard(queue) == client.zcard(parked) == waiting
        assert client.zcard(finish) <= 300
        for name in (finish, queue, parked):
            assert 0 < client.pttl(name) <= 3_600_000
        # Never coming back: after the grace they are dropped, and idle tenants cost nothing.
        gate.acquire(TOOL, "late", fair_key="tenant-x", now_s=BASE_MS / 1000 + 3600)
        assert client.zcard(queue) == client.zcard(parked) == 0
        assert client.zcard(finish) <= 1
    finally:
        delete_prefix(client, prefix)


def test_a_quiet_tenant_is_served_within_its_fair_share_of_a_flood(client: redis.Redis) -> None:
    """Tool 20/1s, tenant A sends 400 at once, tenant B 10 calls 0.1 s later: FIFO serves B
    after A's backlog (20 s); fair sharing within 10 calls at 10/s plus one window."""
    waits = {}
    for fair in (False, True):
        scenario = Scenario(20, 1000, None, (1, 1), 60_000,
                            (Burst(0, 0, 400, 1), Burst(1, 100, 10, 1)))
        prefix = f"fair-{uuid.uuid4().hex[:8]}"
        try:
            run = simulate(client, prefix, scenario, fair=fair)
        finally:
            delete_prefix(client, prefix)
        assert_windows_hold(run.admissions, scenario)
        waits[fair] = max(c.admitted_ms - c.arrival_ms for c in run.calls.values()  # type: ignore[operator]
                          if c.tenant == 1)
    assert waits[False] > 19_000
    assert waits[True] <= 1_000 + 1_000


def pool_config(fair: bool) -> dict[str, object]:
    pool: dict[str, object] = {"limits": ["20/1s"], "shares": {"std": 1.0}}
    if fair:
        pool["fair_by"] = "tenant"
    tool = {"limits": ["1000/1s"], "max_delay": "60s", "pool": "p", "priority": "std",
            "params": {"type": "object", "properties": {"tenant": {"type": "string"}},
                       "required": ["tenant"]}}
    return {"pools": {"p": pool}, "tools": {"x": tool, "y": tool}}


def test_a_pool_shared_by_tenant_serves_a_quiet_tenant_of_another_tool_within_its_share(
    client: redis.Redis,
) -> None:
    """Pool 20/1s shared by tenant: A floods tool x with 200 calls, B sends 10 to tool y
    0.1 s later; B waits its share (10 calls at 10/s) plus a window and the horizon."""
    waits = {}
    for fair in (False, True):
        prefix = f"fair-{uuid.uuid4().hex[:8]}"
        gate = Gate(client, load_config(pool_config(fair)), prefix=prefix)
        calls = {f"a{i}": ("x", "a", 0) for i in range(200)}
        calls |= {f"b{i}": ("y", "b", 100) for i in range(10)}
        events = [(at, i, m) for i, (m, (_, _, at)) in enumerate(calls.items())]
        heapq.heapify(events)
        admitted: dict[str, float] = {}
        sequence = len(events)
        try:
            while events:
                at, _, member = heapq.heappop(events)
                tool, tenant, _ = calls[member]
                decision = gate.acquire(tool, member, fair_key=tenant,
                                        now_s=(BASE_MS + at) / 1000)
                if decision.action is Action.ADMIT:
                    admitted[member] = at
                else:
                    assert decision.action is Action.DELAY, decision
                    sequence += 1
                    back = max(math.ceil(decision.slot_at * 1000 - BASE_MS - 1e-3), at + 1)
                    heapq.heappush(events, (back, sequence, member))
        finally:
            delete_prefix(client, prefix)
        assert_windows_hold([(at, 1) for at in admitted.values()],
                            Scenario(20, 1000, None, (1,), 60_000, ()))
        waits[fair] = max(admitted[f"b{i}"] - 100 for i in range(10))
    assert waits[False] > 8_000
    assert waits[True] <= 1_000 + 1_000 + 520


def test_a_fair_tool_refuses_a_call_without_its_tenant(client: redis.Redis) -> None:
    scenario = Scenario(5, 1000, None, (1,), 60_000, ())
    gate = Gate(client, load_config(config_for(scenario, True)), prefix="fair-refused")
    with pytest.raises(InvalidToolCall, match="shared fairly by 'tenant': pass fair_key="):
        gate.acquire(TOOL, "m")


def test_the_async_gate_parks_like_the_sync_one(redis_url: str, client: redis.Redis) -> None:
    scenario = Scenario(2, 1000, None, (1,), 60_000, ())
    prefix = f"fair-{uuid.uuid4().hex[:8]}"

    async def main() -> list[str]:
        gate = AsyncGate(redis_url, load_config(config_for(scenario, True)), prefix=prefix)
        try:
            return [(await gate.acquire(TOOL, f"m{i}", fair_key="a",
                                        now_s=BASE_MS / 1000)).reason for i in range(3)]
        finally:
            await gate.aclose()

    try:
        assert asyncio.run(main()) == ["admitted", "admitted", "parked"]
    finally:
        delete_prefix(client, prefix)


def test_a_weight_set_at_run_time_gives_a_tenant_its_larger_share(client: redis.Redis) -> None:
    """Two tenants flood a 20/1s tool; a live weight of 3 for B (set before the run) gives
    B about 3/4 of the slots while both wait, and resetting it gives back the file's."""
    scenario = Scenario(20, 1000, None, (1, 1), 60_000,
                        (Burst(0, 0, 200, 1), Burst(1, 0, 200, 1)))
    config = load_config(config_for(scenario, True))
    shares = []
    for weight in (3.0, None):
        prefix = f"fair-{uuid.uuid4().hex[:8]}"
        if weight is not None:
            set_live_weight(client, config, TOOL, "t1", weight, prefix=prefix)
        try:
            run = simulate(client, prefix, scenario, fair=True)
            if weight is not None:
                assert reset_live_weight(client, config, TOOL, "t1", prefix=prefix)
        finally:
            delete_prefix(client, prefix)
        early = [c for c in run.calls.values()
                 if c.admitted_ms is not None and 2_000 <= c.admitted_ms < 12_000]
        shares.append(sum(c.tenant == 1 for c in early) / len(early))
    assert 0.70 <= shares[0] <= 0.80, shares
    assert 0.45 <= shares[1] <= 0.55, shares


def test_fair_sharing_runs_the_same_on_the_embedded_emulation(client: redis.Redis) -> None:
    """The embedded demo runs the same script on fakeredis: same answers as real Redis."""
    scenario = Scenario(2, 1000, None, (1, 1), 60_000, ())
    calls = [("a0", "t0"), ("a1", "t0"), ("a2", "t0"), ("a3", "t0"), ("b0", "t1")]
    answers = []
    for store in (client, fakeredis.FakeRedis()):
        prefix = f"fair-{uuid.uuid4().hex[:8]}"
        gate = Gate(store, load_config(config_for(scenario, True)), prefix=prefix)
        try:
            answers.append([gate.acquire(TOOL, m, fair_key=t, now_s=BASE_MS / 1000)
                            for m, t in calls])
        finally:
            delete_prefix(client, prefix)
    assert answers[0] == answers[1]
    assert [d.reason for d in answers[0]] == ["admitted", "admitted", "parked", "parked",
                                              "parked"]
    assert answers[0][4].wait_s < answers[0][3].wait_s  # B's first call goes ahead of A's
