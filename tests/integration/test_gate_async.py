"""AsyncGate: the same scripts over redis.asyncio, and `slot()` for apps without Celery.

Each test drives its own event loop with `asyncio.run` on the real Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from tests.support.reservations import reservations_async
from throttle import Action, AsyncGate, Decision, Gate, Throttled, load_config
from throttle.keys import tool_keys

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
FALLBACK = {"ok": False, "source": "fallback"}
CONFIG = load_config(
    {
        "tools": {
            "scenario": {"limits": ["2/10s", "3/60s"], "max_delay": "5m"},
            "free": {"limits": ["5/60s"], "max_delay": "1m"},
            "quick": {"limits": ["2/1s"], "max_delay": "5s"},
            "tight": {
                "limits": ["1/60s"],
                "max_delay": "1s",
                "result": {"type": "object", "required": ["ok", "source"]},
                "fallback": FALLBACK,
            },
            "cancel": {"limits": ["1/2s"], "max_delay": "10s"},
        }
    }
)

Step = tuple[str, str, dict[str, Any]]
SCENARIO: list[Step] = [
    ("acquire", "a", {"now_s": P}),
    ("acquire", "b", {"now_s": P + 1}),
    ("acquire", "c", {"now_s": P + 2}),
    ("acquire", "d", {"now_s": P + 2, "cost": 2}),
    ("acquire", "c", {"now_s": P + 3}),
    ("acquire", "a", {"now_s": P + 4}),
    ("release", "d", {}),
    ("acquire", "e", {"now_s": P + 5, "deadline_s": 1}),
    ("acquire", "f", {"now_s": P + 5, "cost": 4}),
    ("acquire", "c", {"now_s": P + 10.5}),
    ("acquire", "g", {"now_s": P + 11}),
    ("acquire", "g", {"now_s": P + 70}),
    ("release", "a", {}),
]


def run_sync(gate: Gate) -> list[Decision | bool]:
    answers: list[Decision | bool] = []
    for kind, member, kwargs in SCENARIO:
        if kind == "acquire":
            answers.append(gate.acquire("scenario", member, **kwargs))
        else:
            answers.append(gate.release("scenario", member))
    return answers


async def run_async(gate: AsyncGate) -> list[Decision | bool]:
    answers: list[Decision | bool] = []
    for kind, member, kwargs in SCENARIO:
        if kind == "acquire":
            answers.append(await gate.acquire("scenario", member, **kwargs))
        else:
            answers.append(await gate.release("scenario", member))
    return answers


def with_gate(redis_url: str, prefix: str, body: Callable[[AsyncGate], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        try:
            return await body(gate)
        finally:
            await gate.aclose()

    return asyncio.run(main())


def test_the_async_gate_decides_exactly_as_the_sync_gate(
    redis_client: redis.Redis, redis_url: str, prefix: str
) -> None:
    sync_answers = run_sync(Gate(redis_client, CONFIG, prefix=f"{prefix}:sync"))
    async_answers = with_gate(redis_url, f"{prefix}:async", run_async)
    assert async_answers == sync_answers
    reasons = {answer.reason for answer in sync_answers if isinstance(answer, Decision)}
    assert {"admitted", "reserved", "early", "readmitted", "deadline", "reservation"} <= reasons
    logs = [
        redis_client.zrange(tool_keys(f"{prefix}:{side}", "scenario").log, 0, -1, withscores=True)
        for side in ("sync", "async")
    ]
    assert logs[0] == logs[1] != []


def test_a_slot_is_entered_at_once_when_the_tool_is_free(redis_url: str, prefix: str) -> None:
    """Entering costs what one acquire costs (measured first, in the same loop): no wait."""
    async def body(gate: AsyncGate) -> tuple[Decision, float, float]:
        began = time.monotonic()
        await gate.acquire("free", "warm-up")
        one_call = time.monotonic() - began
        started = time.monotonic()
        async with gate.slot("free") as decision:
            return decision, time.monotonic() - started, one_call

    decision, elapsed, one_call = with_gate(redis_url, prefix, body)
    assert (decision.action, decision.reason, decision.wait_s) == (Action.ADMIT, "admitted", 0)
    assert elapsed < 3 * one_call + 0.05, (elapsed, one_call)


def test_a_slot_waits_for_its_reserved_time(redis_url: str, prefix: str) -> None:
    async def body(gate: AsyncGate) -> list[tuple[float, Decision]]:
        started = time.monotonic()
        entered = []
        for _ in range(3):
            async with gate.slot("quick") as decision:
                entered.append((time.monotonic() - started, decision))
        return entered

    entered = with_gate(redis_url, prefix, body)
    (t1, first), (_, second), (t3, third) = entered
    assert (first.reason, second.reason) == ("admitted", "admitted")
    assert first.wait_s == second.wait_s == 0
    assert second.slot_at - first.slot_at < 1, "both in the first window (server time)"
    margin_s = CONFIG.tool("quick").slot_margin_ms / 1000
    # The third call waits for the first one's window to pass: it enters no sooner.
    assert t3 - t1 >= 1 + margin_s - 0.01, "the third call waits for the first one's window"
    assert (third.action, third.reason) == (Action.ADMIT, "reservation")
    # Admitted at its slot, or a little after it on a busy machine, never before.
    planned = first.slot_at + 1 + margin_s
    assert planned - 0.001 <= third.slot_at < planned + 0.2


def test_a_slot_that_would_miss_its_deadline_raises_throttled_with_the_fallback(
    redis_url: str, prefix: str
) -> None:
    async def body(gate: AsyncGate) -> tuple[Throttled, float, float]:
        began = time.monotonic()
        async with gate.slot("tight"):
            pass
        admitted = time.monotonic() - began
        started = time.monotonic()
        with pytest.raises(Throttled) as caught:
            async with gate.slot("tight"):
                pytest.fail("the block must not run")
        return caught.value, time.monotonic() - started, admitted

    error, elapsed, admitted = with_gate(redis_url, prefix, body)
    # At once: as fast as the admission before it, not after waiting out the 1 s deadline.
    assert elapsed < admitted + 0.5, (elapsed, admitted)
    assert (error.tool, error.reason, error.fallback) == ("tight", "deadline", FALLBACK)
    assert "tight" in str(error)


def test_a_caller_deadline_tighter_than_max_delay_raises_throttled(
    redis_url: str, prefix: str
) -> None:
    async def body(gate: AsyncGate) -> Throttled:
        for _ in range(2):
            async with gate.slot("quick"):
                pass
        with pytest.raises(Throttled) as caught:
            async with gate.slot("quick", deadline_s=0.5):
                pass
        return caught.value

    assert with_gate(redis_url, prefix, body).reason == "deadline"


def test_a_cancelled_slot_gives_its_reservation_back(redis_url: str, prefix: str) -> None:
    async def body(gate: AsyncGate) -> tuple[Decision, Decision]:
        async with gate.slot("cancel") as first:
            pass

        async def waiter() -> None:
            async with gate.slot("cancel"):
                pass

        task = asyncio.create_task(waiter())
        keys = tool_keys(prefix, "cancel")
        while not await reservations_async(gate.client, keys):  # it holds the slot 2 s on, asleep
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return first, await gate.acquire("cancel", "next")

    first, following = with_gate(redis_url, prefix, body)
    margin_s = CONFIG.tool("cancel").slot_margin_ms / 1000
    assert following.slot_at == pytest.approx(first.slot_at + 2 + margin_s, abs=0.005)
