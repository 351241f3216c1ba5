"""The gate's hot path: EVALSHA straight through a connection, and one pipeline per asyncio tick.

A server that lost its scripts answers NOSCRIPT once and the gate loads them; the asyncio
gate answers a tick's concurrent acquires (and settles, with them) from one pipeline, on one
connection, with the same decisions one at a time would give; a failed round trip fails each
of its calls with StoreUnavailable, a script's error only its own call, and a cancelled
caller leaves the others their answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
import redis

from tests.integration.test_gate_store_errors import SilentServer, free_port, silent  # noqa: F401
from throttle import (
    Action,
    AsyncGate,
    Decision,
    Gate,
    InvalidToolCall,
    StoreUnavailable,
    load_config,
)
from throttle.keys import keys_for

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
CONFIG = load_config(
    {
        "tools": {
            "ten": {"limits": ["10/1s"], "max_delay": "1m"},
            "wide": {"limits": ["1000000/10m"], "max_delay": "1m"},
        }
    }
)
IN_FLIGHT = 50


def connections(gate: AsyncGate) -> int:
    """How many connections the asyncio gate's pool has opened."""
    pool: Any = getattr(gate.client, "connection_pool")  # noqa: B009  # a single server
    return len(pool._available_connections) + len(pool._in_use_connections)


def test_the_sync_gate_loads_its_script_once_after_a_script_flush(
    redis_client: redis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    gate._decide_lane.functions = False  # decisions as EVALSHA (a server without FCALL)
    loads: list[str] = []
    load = gate.client.script_load

    def counted_load(source: str) -> Any:
        loads.append(source)
        return load(source)

    monkeypatch.setattr(gate.client, "script_load", counted_load)
    try:
        assert gate.acquire("wide", "warm").action is Action.ADMIT
        redis_client.script_flush()
        loads.clear()
        answers = [gate.acquire("wide", f"m{i}").action for i in range(5)]
        assert answers == [Action.ADMIT] * 5
        assert len(loads) == 1  # refused once (NOSCRIPT), loaded, then EVALSHA again
    finally:
        gate.close()


def test_fifty_concurrent_acquires_share_one_connection_and_decide_as_one_at_a_time(
    redis_url: str, prefix: str
) -> None:
    async def burst() -> tuple[list[Decision], int]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            answers = await asyncio.gather(
                *(gate.acquire("ten", f"m{i:02d}", now_s=P) for i in range(IN_FLIGHT))
            )
            return list(answers), connections(gate)
        finally:
            await gate.aclose()

    answers, opened = asyncio.run(burst())
    assert opened == 1  # one pipeline per tick, not one connection per call in flight
    assert Counter(d.action for d in answers) == {Action.ADMIT: 10, Action.DELAY: 40}
    # In the order they were made: the first 10 admitted, then 10 per following second.
    assert [d.action for d in answers[:10]] == [Action.ADMIT] * 10
    slots = [round(d.slot_at - P) for d in answers[10:]]
    assert slots == sorted(slots) and Counter(slots) == {1: 10, 2: 10, 3: 10, 4: 10}


def test_a_batch_after_a_script_flush_is_loaded_once_and_answered_in_full(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    async def burst() -> list[Decision]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            await gate.acquire("wide", "warm")
            redis_client.script_flush()
            return list(
                await asyncio.gather(*(gate.acquire("wide", f"m{i}") for i in range(IN_FLIGHT)))
            )
        finally:
            await gate.aclose()

    answers = asyncio.run(burst())
    assert [d.action for d in answers] == [Action.ADMIT] * IN_FLIGHT


def test_a_tick_s_settles_share_the_acquires_round_trip_and_each_gets_its_own_answer(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    async def burst() -> tuple[list[Any], int]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            await asyncio.gather(*(gate.acquire("ten", f"m{i}", now_s=P) for i in range(5)))
            await gate.settle("ten", "m0", 1)  # loaded (a refused call would run last)
            # "wide"'s log is not a sorted set: a settle there fails (WRONGTYPE), alone.
            redis_client.set(keys_for(prefix, CONFIG.tool("wide")).log, "not a log")
            calls = [gate.settle("ten", f"m{i}", 3) for i in range(5)]  # in the windows
            calls += [gate.settle("ten", "never-admitted", 3), gate.settle("wide", "m0", 3)]
            calls += [gate.acquire("ten", f"m{i}", now_s=P) for i in range(5, 10)]
            answers = await asyncio.gather(*calls, return_exceptions=True)
            return list(answers), connections(gate)
        finally:
            await gate.aclose()

    answers, opened = asyncio.run(burst())
    assert opened == 1  # the settles and acquires of one tick went as one pipeline
    assert answers[:6] == [True] * 5 + [False]
    assert isinstance(answers[6], StoreUnavailable) and "WRONGTYPE" in str(answers[6])
    # In order: the 5 admitted calls now weigh 15 of "ten"'s 10, so the next 5 wait.
    assert [a.action for a in answers[7:]] == [Action.DELAY] * 5
    cost = keys_for(prefix, CONFIG.tool("ten")).cost
    assert redis_client.hgetall(cost) == {f"m{i}".encode(): b"3" for i in range(5)}


def test_a_settle_that_may_wait_rides_with_the_next_acquire_or_goes_alone_when_its_wait_ends(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    cost = keys_for(prefix, CONFIG.tool("ten")).cost

    async def run() -> tuple[Any, bool, Decision, float]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            for member in ("m0", "m1"):
                await gate.acquire("ten", member, now_s=P)
            await gate.settle("ten", "m0", 1)  # loaded (a refused call would be sent again)
            waiting = asyncio.ensure_future(gate.settle("ten", "m0", 3, wait_s=60))
            await asyncio.sleep(0.1)
            unsent = redis_client.hget(cost, "m0")
            decision = await gate.acquire("ten", "m2", now_s=P)
            settled = await asyncio.wait_for(waiting, 1)  # sent with the acquire, not in 60 s
            started = time.monotonic()
            assert await gate.settle("ten", "m1", 2, wait_s=0.2)  # nothing to ride with
            return unsent, settled, decision, time.monotonic() - started
        finally:
            await gate.aclose()

    unsent, settled, decision, alone_s = asyncio.run(run())
    assert unsent is None and settled and decision.action is Action.ADMIT
    assert 0.2 <= alone_s < 2
    assert redis_client.hgetall(cost) == {b"m0": b"3", b"m1": b"2"}


def test_a_lone_call_s_script_error_is_its_own_and_the_connection_stays_in_step(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    redis_client.set(keys_for(prefix, CONFIG.tool("wide")).log, "not a log")

    async def run() -> tuple[Any, Decision, int]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            failed = await asyncio.gather(gate.acquire("wide", "m0"), return_exceptions=True)
            return failed[0], await gate.acquire("ten", "m1"), connections(gate)
        finally:
            await gate.aclose()

    failed, decision, opened = asyncio.run(run())
    assert isinstance(failed, StoreUnavailable) and "WRONGTYPE" in str(failed)
    assert decision.action is Action.ADMIT and opened == 1


def test_a_cancelled_caller_leaves_the_others_of_its_batch_their_answers(
    redis_url: str, prefix: str
) -> None:
    async def burst() -> tuple[list[Any], int]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            tasks = [
                asyncio.ensure_future(gate.acquire("wide", f"m{i}")) for i in range(IN_FLIGHT)
            ]
            await asyncio.sleep(0)  # every call is queued for this tick's pipeline
            tasks[7].cancel()
            answers = await asyncio.gather(*tasks, return_exceptions=True)
            return answers, connections(gate)
        finally:
            await gate.aclose()

    answers, opened = asyncio.run(burst())
    assert isinstance(answers[7], asyncio.CancelledError)
    rest = answers[:7] + answers[8:]
    assert all(isinstance(d, Decision) and d.action is Action.ADMIT for d in rest)
    assert opened == 1


def test_a_server_that_never_answers_fails_every_call_of_the_batch(
    silent: SilentServer,  # noqa: F811
) -> None:
    url = f"redis://127.0.0.1:{silent.port}/0"

    async def burst() -> tuple[list[Any], float]:
        gate = AsyncGate(url, CONFIG, prefix="throttle-test", socket_timeout_s=0.5)
        started = time.monotonic()
        try:
            answers = await asyncio.gather(
                *(gate.acquire("wide", f"m{i}") for i in range(20)), return_exceptions=True
            )
            return answers, time.monotonic() - started
        finally:
            await gate.aclose()

    answers, elapsed = asyncio.run(burst())
    assert all(isinstance(a, StoreUnavailable) for a in answers), answers
    assert all(url in str(a) for a in answers)
    assert elapsed < 3  # one socket timeout (and one retry at most), not one per call


def test_nothing_listening_fails_every_call_with_store_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def burst() -> list[Any]:
        gate = AsyncGate(url, CONFIG, prefix="throttle-test", socket_timeout_s=0.5)
        try:
            return list(
                await asyncio.gather(
                    *(gate.acquire("wide", f"m{i}") for i in range(10)), return_exceptions=True
                )
            )
        finally:
            await gate.aclose()

    answers = asyncio.run(burst())
    assert all(isinstance(a, StoreUnavailable) for a in answers), answers


@pytest.mark.parametrize(
    ("member", "cost", "wrong"),
    [
        ("m", True, "cost"),
        ("m", "2", "cost"),
        ("m", float("inf"), "cost"),
        (123, 1, "member"),
        ("", 1, "member"),
    ],
)
def test_odd_costs_and_members_are_invalid_calls_that_say_what_to_pass(
    redis_url: str, prefix: str, member: Any, cost: Any, wrong: str
) -> None:
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    try:
        with pytest.raises(InvalidToolCall, match=wrong):
            gate.acquire("wide", member, cost=cost)
    finally:
        gate.close()


def test_a_gate_used_on_a_second_event_loop_says_to_make_one_per_loop(
    redis_url: str, prefix: str
) -> None:
    gate = AsyncGate(redis_url, CONFIG, prefix=prefix)

    left: list[asyncio.Future[bool]] = []

    async def leave_one_waiting() -> None:
        await gate.acquire("ten", "m0", now_s=P)
        left.append(asyncio.ensure_future(gate.settle("ten", "m0", 3, wait_s=0.05)))
        # (the loop ends first)

    async def again() -> None:
        await asyncio.wait_for(gate.settle("ten", "m1", 2, wait_s=0.3), 3)

    asyncio.run(leave_one_waiting())
    with pytest.raises(RuntimeError, match="make one AsyncGate per event loop"):
        asyncio.run(again())  # (not a wait for a timer of the closed loop)


def test_the_server_clock_is_read_in_whole_milliseconds_rounded_down(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    # Whole scores are stored as integers by Redis and parsed without strtod's slow path;
    # rounded down, an admission is never recorded after the moment it was made.
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    try:
        answers = [gate.acquire("ten", f"w{i:02d}") for i in range(15)]
        seconds, micros = redis_client.time()
    finally:
        gate.close()
    assert Counter(d.action for d in answers) == {Action.ADMIT: 10, Action.DELAY: 5}
    log = redis_client.zrange(keys_for(prefix, CONFIG.tools["ten"]).log, 0, -1, withscores=True)
    scores = [score for _, score in log]
    assert len(scores) == 15 and all(score == int(score) for score in scores)
    assert max(scores[:10]) <= seconds * 1000 + micros / 1000  # admissions: never after TIME
