"""Direct mode with a coroutine body (`workers.tools.llm_async:chat_completion`), awaited on
the gateway's event loop: every case of test_gateway_direct.py holds as with the threaded
body (the gate's windows, the upstream's pauses, settling, the store's outage and what the
upstream reports of its limits).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration import test_gateway_direct as threaded

pytestmark = [pytest.mark.redis, pytest.mark.slow]

stub = threaded.stub
gateway_stack = threaded.gateway_stack
ON_LOOP = ("--direct", "workers.tools.llm_async:chat_completion")


@pytest.fixture(autouse=True)
def coroutine_body(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(threaded, "DIRECT", ON_LOOP)
    yield


test_serves_within_the_limit_and_answers_the_rest_with_429_and_fallback = (
    threaded.test_direct_mode_serves_within_the_limit_and_answers_the_rest_with_429_and_fallback)
test_waits_out_an_upstream_pause_or_falls_back_when_it_outlasts_the_deadline = (
    threaded.test_direct_mode_waits_out_an_upstream_pause_or_falls_back_when_it_outlasts_the_deadline)
test_settles_a_token_charge_to_the_upstream_s_usage = (
    threaded.test_direct_mode_settles_a_token_charge_to_the_upstream_s_usage)
test_answers_with_the_fallback_when_the_gate_s_redis_is_gone = (
    threaded.test_direct_mode_answers_with_the_fallback_when_the_gate_s_redis_is_gone)
test_teaches_an_adaptive_tool_the_limit_the_upstream_reports = (
    threaded.test_direct_mode_teaches_an_adaptive_tool_the_limit_the_upstream_reports)
