"""The gateway's `x-ratelimit-*` headers (OpenAI's format) for a tool with a daily quota,
through real workers and the stub upstream: the limit, what is left, and when it resets."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import openai
import pytest

from tests.integration import test_gateway
from tests.integration.test_gateway import Stack, weather_call
from throttle.gateway.quota_headers import openai_duration

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

# The gateway tests' fixtures: workers, the gateway and the stub upstream.
gateway_stack = test_gateway.gateway_stack
stub = test_gateway.stub


def test_answers_carry_the_quota_left_and_its_reset_until_it_is_spent(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack(weather_limits=("1000/1s", "2/1d"), weather_delay="2s")
    client = stack.client()
    left = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**weather_call())
        assert raw.http_response.status_code == 200
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert re.fullmatch(r"(\d+h)?\d+m\d+s|[\d.]+s", raw.headers["x-ratelimit-reset-requests"])
        left.append(raw.headers["x-ratelimit-remaining-requests"])
    assert left == ["1", "0"]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**weather_call())
    headers = refused.value.response.headers
    assert headers["x-throttle-fallback-reason"] == "quota"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # Nothing frees up before midnight (UTC, the default quota_tz): Retry-After says so.
    to_midnight_s = 86_400 - time.time() % 86_400
    assert abs(int(headers["retry-after"]) - to_midnight_s) <= 5


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "0.5s"), (59, "59s"), (360, "6m0s"),
                                               (7503, "2h5m3s")])
def test_reset_times_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text
