"""Eager mode (`task_always_eager`): a call waits for its slot in-process or falls back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from celery.result import EagerResult

from throttle import Throttle, fallback_reason, load_config, outcome, wait

pytestmark = [pytest.mark.redis]

PARAMS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture
def eager(redis_url: str, prefix: str) -> Iterator[tuple[Any, list[int]]]:
    """An eager app with tool `pair` at 2/1s (max_delay 5s); the list records body runs."""
    app = Celery("eager", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    config = load_config({"tools": {"pair": {
        "limits": ["2/1s"], "max_delay": "5s", "params": PARAMS,
        "result": {"type": "object"}, "fallback": {"n": -1},
    }}})
    throttle = Throttle(app, config, redis_url, prefix=prefix)
    ran: list[int] = []

    @throttle.tool
    def pair(n: int) -> dict[str, int]:
        ran.append(n)
        return {"n": n}

    yield pair, ran
    throttle.gate.close()


def test_eager_calls_within_the_limit_run_at_once_and_read_as_results(eager: Any) -> None:
    pair, ran = eager
    results = [pair.delay(n=i) for i in range(2)]
    assert all(isinstance(r, EagerResult) for r in results)
    assert [r.state for r in results] == [states.SUCCESS, states.SUCCESS]
    assert [r.get() for r in results] == [{"n": 0}, {"n": 1}]
    assert [outcome(r) for r in results] == ["result", "result"]
    assert ran == [0, 1]


def test_an_eager_call_over_the_limit_sleeps_until_its_slot_without_recursing(
    eager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pair, ran = eager
    started = time.monotonic()
    results = [pair.delay(n=i) for i in range(5)]
    elapsed_s = time.monotonic() - started
    assert [r.state for r in results] == [states.SUCCESS] * 5
    assert [r.get() for r in results] == [{"n": i} for i in range(5)]
    assert all(outcome(r) == "result" for r in results)
    assert ran == [0, 1, 2, 3, 4]  # each body once, in order
    # 5 calls at 2/1s: the fifth call's slot is two windows after the first.
    assert elapsed_s >= 2.0 - 0.05
    assert "re-publish" not in caplog.text


def test_apply_waits_for_the_slot_too(eager: Any) -> None:
    pair, ran = eager
    results = [pair.apply(kwargs={"n": i}) for i in range(3)]
    assert [r.get() for r in results] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(outcome(r) == "result" for r in results)
    assert ran == [0, 1, 2]


def test_an_eager_call_whose_slot_misses_its_deadline_falls_back_at_once(eager: Any) -> None:
    pair, ran = eager
    [pair.delay(n=i) for i in range(2)]
    started = time.monotonic()
    late = pair.apply_async(kwargs={"n": 9}, deadline_s=0.2)
    assert time.monotonic() - started < 0.2  # no sleep: the gate refused at once
    assert late.state == states.SUCCESS
    assert late.get() == {"n": -1}
    assert outcome(late) == "fallback"
    assert fallback_reason(late) == "deadline"
    assert asyncio.run(wait(late)) == {"n": -1}  # awaiting an eager call answers at once
    assert ran == [0, 1]
    # Nothing was reserved for it: the next call takes the first free slot.
    again = pair.delay(n=3)
    assert outcome(again) == "result" and ran == [0, 1, 3]


def test_an_eager_call_past_a_deadline_it_waited_for_falls_back(redis_url: str,
                                                                   prefix: str) -> None:
    """A cooldown longer than the deadline: the call falls back instead of waiting."""
    app = Celery("eager-cooldown", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    config = load_config({"tools": {"busy": {
        "limits": ["10/1s"], "max_delay": "1s", "params": PARAMS,
        "result": {"type": "object"}, "fallback": {"n": -1},
    }}})
    throttle = Throttle(app, config, redis_url, prefix=prefix)
    runs: list[int] = []

    @throttle.tool
    def busy(n: int) -> dict[str, int]:
        from throttle import UpstreamBusy

        runs.append(n)
        if len(runs) == 1:
            raise UpstreamBusy(0.3, "busy")
        return {"n": n}

    try:
        waited = busy.delay(n=1)  # paused 0.3 s, then runs again in-process
        assert waited.get() == {"n": 1} and outcome(waited) == "result"
        assert runs == [1, 1]
        throttle.gate.cool_down("busy", 5.0)
        refused = busy.delay(n=2)
        assert outcome(refused) == "fallback" and refused.get() == {"n": -1}
    finally:
        throttle.gate.close()
