"""The LLM tool's asyncio body (`workers.tools.llm_async`) answers and fails as the plain one.

Both bodies call the real stub upstream (`throttle stub-llm` in its own process on
127.0.0.1) with the same settings; each case runs the plain body, then the asyncio one on a
fresh event loop, and compares what they return, raise and report.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import StubServer
from throttle import adaptive
from throttle.errors import UpstreamBusy
from workers.tools import llm, llm_async
from workers.tools.llm import ModelAnswerError
from workers.tools.llm_http import UpstreamError

pytestmark = [pytest.mark.slow]

SCHEMA = {"type": "object", "required": ["city", "days"],
          "properties": {"city": {"type": "string", "minLength": 2},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
CALL = {
    "messages": [{"role": "user", "content": "Weather in Lyon this week?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}],
    "tool_choice": "get_weather",
    "max_tokens": 32,
}


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StubServer]:
    server = StubServer(tmp_path / "stub.log")
    monkeypatch.setenv("THROTTLE_LLM_BASE_URL", server.url)
    monkeypatch.setenv("THROTTLE_LLM_MODEL", "stub-1")
    monkeypatch.setenv("THROTTLE_LLM_API_KEY", "")
    monkeypatch.setenv("THROTTLE_LLM_BACKOFF_S", "0.05")
    try:
        yield server
    finally:
        server.stop()


def both(call: dict[str, Any] | None = None) -> list[tuple[Any, list[adaptive.Answer]]]:
    """What the plain body, then the asyncio one, returned (or raised), and what they reported
    to the adaptive limits."""
    async def on_loop(answers: list[adaptive.Answer]) -> Any:
        try:
            with adaptive.collecting(answers):
                return await llm_async.chat_completion(**(call or CALL))
        finally:
            await llm_async.chat_completion.aclose()

    outcomes = []
    for run in (lambda answers: llm.chat_completion(**(call or CALL)),
                lambda answers: asyncio.run(on_loop(answers))):
        answers: list[adaptive.Answer] = []
        try:
            with adaptive.collecting(answers):
                outcomes.append((run(answers), answers))
        except Exception as exc:
            outcomes.append((exc, answers))
    return outcomes


def same_error(outcomes: list[tuple[Any, list[adaptive.Answer]]],
               kind: type[Exception]) -> Exception:
    (plain, _), (on_loop, _) = outcomes
    assert isinstance(plain, kind) and isinstance(on_loop, kind), outcomes
    assert (str(on_loop), on_loop.args[1:]) == (str(plain), plain.args[1:])
    return on_loop


def test_the_asyncio_body_returns_what_the_plain_one_returns_and_reports_the_headers(
    stub: StubServer,
) -> None:
    stub.configure(limit_headers="openai", hidden_requests=600, hidden_window_s=60)
    (plain, heard), (on_loop, heard_on_loop) = both()
    assert on_loop == plain and on_loop["tool"] == "get_weather"
    assert len(heard) == len(heard_on_loop) == 1 and heard_on_loop[0].status == 200
    assert (heard_on_loop[0].headers["x-ratelimit-limit-requests"]
            == heard[0].headers["x-ratelimit-limit-requests"] == "600")


def test_a_429_is_a_pause_and_a_4xx_a_clear_refusal_that_never_shows_the_key(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stub.configure(busy_next=2, retry_after_s=7)
    busy = same_error(both(), UpstreamBusy)
    assert isinstance(busy, UpstreamBusy) and busy.retry_after_s == 7

    key = f"sk-canary-{uuid.uuid4().hex}"
    stub.configure(busy_next=0, api_key="another-key")
    monkeypatch.setenv("THROTTLE_LLM_API_KEY", key)
    refused = same_error(both(), UpstreamError)
    assert "refused the request (401)" in str(refused) and key not in str(refused)


def test_5xx_and_timeouts_are_retried_to_the_bound_then_fail_with_the_same_message(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("THROTTLE_LLM_MAX_RETRIES", "1")
    stub.configure(fail_for_s=60, fail_status=502)
    failed = same_error(both(), UpstreamError)
    assert "answered 502" in str(failed) and "2 attempt(s)" in str(failed)
    assert [e["status"] for e in stub.stats()["log"]] == [502] * 4

    stub.configure(fail_until=0, latency_s=1.0)
    monkeypatch.setenv("THROTTLE_LLM_READ_TIMEOUT_S", "0.3")
    plain, on_loop = (error for error, _ in both())
    assert isinstance(plain, UpstreamError) and isinstance(on_loop, UpstreamError)
    for error in (plain, on_loop):
        assert "timed out" in str(error) and "read timeout 0.3s" in str(error)
    stub.configure(latency_s=0.0)
    time.sleep(1.0)  # the stub finishes the answers nobody waits for


def test_the_asyncio_body_checks_the_answer_as_the_plain_one_does(stub: StubServer) -> None:
    stub.configure(answer="bad_json")
    error = same_error(both(), ModelAnswerError)
    assert "not valid JSON" in str(error)


def test_a_change_of_settings_makes_a_new_session_and_aclose_closes_every_one(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = llm_async.AsyncChat()

    async def twice(change: Callable[[], None]) -> list[bool]:
        await body(**CALL)
        first = body._session
        change()
        await body(**CALL)
        assert body._session is not first and first is not None
        await body.aclose()
        return [first.http.closed]

    assert asyncio.run(twice(lambda: monkeypatch.setenv("THROTTLE_LLM_MAX_RETRIES", "0"))) == [
        True]
