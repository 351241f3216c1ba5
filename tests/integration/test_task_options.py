"""Celery task options and `apply_async` options on throttled tools, in Celery's in-process
worker (the `throttle.testing` fixtures over pytest-celery's `celery_app`), gated on the real
Redis: bind, the body's own retries and autoretry_for, ignore_result, countdown / eta,
expires, priority, headers and task_id; rate_limit and options throttle owns are refused."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Retry

from throttle import ConfigError, Throttle, fallback_reason, load_config, outcome
from throttle.config import Config

pytestmark = [pytest.mark.redis, pytest.mark.celery]

PARAMS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
RESULT = {"type": "object"}


def tool(limits: list[str], max_delay: str) -> dict[str, Any]:
    return {"limits": limits, "max_delay": max_delay, "params": PARAMS, "result": RESULT,
            "fallback": {"n": -1}}


CONFIG = {"tools": {
    "bound": tool(["100/1s"], "5s"),
    "flaky": tool(["1/1s"], "10s"),     # each attempt waits for a slot of its own
    "broken": tool(["100/1s"], "5s"),
    "quiet": tool(["100/1s"], "5s"),
    "prompt": tool(["100/1s"], "0.5s"),  # a deadline shorter than the countdowns below
    "scarce": tool(["1/2s"], "10s"),
    "later": tool(["100/1s"], "0.5s"),  # its retry is due 1.5 s later: past the first deadline
}}
RUNS: list[dict[str, Any]] = []  # what bodies saw; the worker runs in this process


def record(task: Any, n: int, **extra: Any) -> dict[str, Any]:
    request = task.request
    RUNS.append({"tool": task.tool.name, "n": n, "id": request.id, "retries": request.retries,
                 "delays": getattr(request, "throttle_delays", 0) or 0,
                 "headers": dict(request.headers or {}),
                 "priority": (request.delivery_info or {}).get("priority"),
                 "admitted_at": getattr(request, "throttle_admitted_at", None), **extra})
    return {"n": n}


@pytest.fixture
def throttle_config() -> Config:
    return load_config(CONFIG)


@pytest.fixture
def throttle_redis_url(redis_url: str) -> str:
    return redis_url  # the suite's real Redis, under this test's own key prefix


@pytest.fixture
def throttle_tools(throttle: Throttle) -> Iterator[dict[str, Any]]:
    RUNS.clear()

    @throttle.tool("bound", bind=True, acks_late=False)
    def bound(self: Any, n: int) -> dict[str, Any]:
        return record(self, n, task_name=self.name)

    @throttle.tool("flaky", bind=True, max_retries=2)
    def flaky(self: Any, n: int) -> dict[str, Any]:
        record(self, n)
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return {"n": n, "attempts": self.request.retries + 1}

    @throttle.tool("broken", bind=True, autoretry_for=(ValueError,), max_retries=2,
                   retry_backoff=False, default_retry_delay=0)
    def broken(self: Any, n: int) -> dict[str, Any]:
        record(self, n)
        raise ValueError(f"broken body {n}")

    @throttle.tool("quiet", bind=True, ignore_result=True)
    def quiet(self: Any, n: int) -> dict[str, Any]:
        return record(self, n)

    @throttle.tool("prompt", bind=True)
    def prompt(self: Any, n: int) -> dict[str, Any]:
        return record(self, n)

    @throttle.tool("scarce", bind=True)
    def scarce(self: Any, n: int) -> dict[str, Any]:
        return record(self, n)

    @throttle.tool("later", bind=True)
    def later(self: Any, n: int) -> dict[str, Any]:
        record(self, n)
        if not self.request.retries:
            raise self.retry(countdown=1.5)
        return {"n": n}

    @throttle.app.task(name="tests.keep", shared=False)
    def keep(value: Any) -> None:
        RUNS.append({"tool": "keep", "value": value})

    yield {"bound": bound, "flaky": flaky, "broken": broken, "quiet": quiet,
           "prompt": prompt, "scarce": scarce, "later": later, "keep": keep}
    RUNS.clear()


def gate_log(throttle: Throttle, tool_name: str) -> list[str]:
    client = redis.Redis.from_url(str(throttle.redis_url))
    members = client.zrange(f"{throttle.prefix}:{{{tool_name}}}:log", 0, -1)
    client.close()
    return sorted(member.decode() for member in members)


def test_bind_gives_the_body_its_task_and_options_pass_through(throttle_tools: dict[str, Any],
                                      throttle_worker: Any) -> None:
    result = throttle_tools["bound"].delay(n=1)
    assert result.get(timeout=10) == {"n": 1}
    assert RUNS[0]["task_name"] == "tool.bound" and RUNS[0]["id"] == result.id
    assert throttle_tools["bound"].acks_late is False  # the option beats throttle's default
    assert throttle_tools["flaky"].acks_late is True


def test_a_body_retry_is_a_new_admission_and_throttle_delays_never_use_its_retries(
    throttle: Throttle, throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    result = throttle_tools["flaky"].apply_async(kwargs={"n": 7}, headers={"trace_id": "t-7"})
    assert result.get(timeout=20) == {"n": 7, "attempts": 3}
    assert [run["headers"].get("trace_id") for run in RUNS] == ["t-7"] * 3
    print(f"\nretries at 1/1s: {[(run['retries'], run['delays']) for run in RUNS]} "
          "(retry number, throttle delays of that attempt)")
    assert [run["retries"] for run in RUNS] == [0, 1, 2]
    # Each retry waited for a slot of its own (1/1s), in re-published delays that left the
    # retry count alone, and started with no delays of the attempt before.
    assert all(run["delays"] >= 1 for run in RUNS[1:])
    assert all(run["headers"].get("throttle_delays", 0) <= 1 for run in RUNS)
    # Each attempt is its own admission in the 1/1s window (the gate keeps only the last).
    admitted = [run["admitted_at"] for run in RUNS]
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(admitted))
    assert gate_log(throttle, "flaky") == [f"{result.id}~retry2"]
    assert outcome(result) == "result"


def test_a_retry_s_deadline_counts_from_when_the_retry_is_due(
    throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    """max_delay is 0.5 s and the retry is due 1.5 s after the first attempt: it still runs."""
    result = throttle_tools["later"].delay(n=5)
    assert result.get(timeout=10) == {"n": 5}
    assert outcome(result) == "result"
    assert [run["retries"] for run in RUNS] == [0, 1]


def test_autoretry_for_retries_through_the_gate_until_max_retries(
    throttle: Throttle, throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    result = throttle_tools["broken"].delay(n=3)
    with pytest.raises(ValueError, match="broken body 3"):
        result.get(timeout=20)
    assert [run["retries"] for run in RUNS] == [0, 1, 2]
    assert len(gate_log(throttle, "broken")) == 3


def test_ignore_result_stores_neither_answers_nor_fallbacks_yet_links_receive_them(
    celery_app: Celery, throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    quiet, keep = throttle_tools["quiet"], throttle_tools["keep"]
    answered = quiet.apply_async(kwargs={"n": 1}, link=keep.s())
    fell_back = quiet.apply_async(kwargs={"n": 2}, link=keep.s(), deadline_s=0)
    deadline = time.monotonic() + 10
    while len([run for run in RUNS if run["tool"] == "keep"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(run["value"]["n"] for run in RUNS if run["tool"] == "keep") == [-1, 1]
    assert answered.state == fell_back.state == "PENDING"  # nothing stored
    assert celery_app.backend.get(celery_app.backend.get_key_for_task(fell_back.id)) is None


@pytest.mark.parametrize("when", ["countdown", "eta"])
def test_the_deadline_counts_from_when_a_call_is_due(
    throttle_tools: dict[str, Any], throttle_worker: Any, when: str
) -> None:
    """max_delay is 0.5 s; a call due 1.5 s after it was sent still runs."""
    prompt = throttle_tools["prompt"]
    due = {"countdown": 1.5} if when == "countdown" else {
        "eta": datetime.now(UTC) + timedelta(seconds=1.5)}
    sent = time.monotonic()
    result = prompt.apply_async(kwargs={"n": 1}, **due)
    assert result.get(timeout=10) == {"n": 1}
    assert time.monotonic() - sent >= 1.4
    assert (outcome(result), fallback_reason(result)) == ("result", None)


def test_an_expired_call_is_revoked_by_celery_and_never_runs(
    throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    """One call expires before it is due; another expires while it waits for its slot."""
    scarce = throttle_tools["scarce"]
    assert scarce.delay(n=0).get(timeout=10) == {"n": 0}  # takes the window's only slot
    before_due = scarce.apply_async(kwargs={"n": 1}, countdown=1, expires=0.3)
    while_delayed = scarce.apply_async(kwargs={"n": 2}, expires=0.8)  # its slot is ~2 s away
    time.sleep(3.0)
    assert before_due.state == while_delayed.state == "REVOKED"
    assert [run["n"] for run in RUNS] == [0]


def test_priority_headers_and_task_id_reach_the_body_and_survive_delays(
    throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    scarce = throttle_tools["scarce"]
    first = scarce.apply_async(kwargs={"n": 1}, task_id="call-one", priority=3,
                               headers={"trace_id": "t-1"})
    second = scarce.apply_async(kwargs={"n": 2}, task_id="call-two",
                                headers={"trace_id": "t-2"})  # delayed to the next window
    assert (first.id, second.id) == ("call-one", "call-two")
    assert first.get(timeout=10) == {"n": 1} and second.get(timeout=10) == {"n": 2}
    runs = {run["id"]: run for run in RUNS}
    assert runs["call-one"]["headers"]["trace_id"] == "t-1"
    assert runs["call-one"]["priority"] == 3
    assert runs["call-two"]["delays"] >= 1
    assert runs["call-two"]["headers"]["trace_id"] == "t-2"


def test_a_throttled_tool_refuses_celerys_rate_limit_and_the_options_throttle_sets(
    throttle: Throttle,
) -> None:
    with pytest.raises(ConfigError, match="rate_limit would throttle the tool a second time"):
        throttle.tool("bound", rate_limit="5/s")(lambda n: n)
    with pytest.raises(ConfigError, match="accept JSON only"):
        throttle.tool("bound", serializer="pickle")(lambda n: n)
    for option in ("name", "base", "queue"):
        with pytest.raises(ConfigError, match=f"the task option '{option}' is set by throttle"):
            throttle.tool("bound", **{option: "x"})(lambda n: n)


def test_a_default_rate_limit_on_the_app_is_warned_about(
    caplog: pytest.LogCaptureFixture, throttle_config: Config
) -> None:
    app = Celery("rated", broker="memory://", backend="cache+memory://")
    app.conf.task_default_rate_limit = "10/s"
    with caplog.at_level(logging.WARNING, logger="throttle"):
        Throttle(app, throttle_config, redis_client=redis.Redis())
    assert "limited twice" in caplog.text and "worker_disable_rate_limits" in caplog.text


def test_retry_outside_a_worker_is_celerys_own(throttle_tools: dict[str, Any]) -> None:
    """Called directly (no worker), `retry()` behaves as Celery's: it raises Retry."""
    flaky = throttle_tools["flaky"]
    flaky.push_request(called_directly=False, is_eager=True, retries=0, id="direct")
    try:
        with pytest.raises(Retry):
            flaky.retry(countdown=0, throw=True)
    finally:
        flaky.pop_request()
