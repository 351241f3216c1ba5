"""Reading upstream rate-limit headers, with values real providers send."""

from __future__ import annotations

import logging

import pytest

from throttle.stub.hidden import HiddenLimits
from throttle.upstream_headers import Reading, read_limits, reset_s

NOW = 1_796_378_400.0  # 2026-12-04T10:00:00Z


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("8.64s", 8.64), ("1h2m3s", 3723.0),
])
def test_openai_resets_are_go_durations(text: str, seconds: float) -> None:
    assert reset_s(text, now_s=NOW) == pytest.approx(seconds)


def test_openai_headers_give_requests_and_tokens() -> None:
    limits = read_limits({
        "x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-tokens": "29999981", "x-ratelimit-reset-tokens": "8.64s",
    }, now_s=NOW)
    assert limits.requests == Reading(10000, 9999, 360.0)
    assert limits.tokens == Reading(30000000, 29999981, 8.64)
    assert limits.retry_after_s is None


def test_anthropic_headers_give_rfc3339_resets() -> None:
    limits = read_limits({
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "12",
        "anthropic-ratelimit-requests-reset": "2026-12-04T10:00:30Z",
        "anthropic-ratelimit-input-tokens-limit": "40000",
        "anthropic-ratelimit-input-tokens-remaining": "38000",
        "anthropic-ratelimit-input-tokens-reset": "2026-12-04T10:00:01Z",
        "retry-after": "30",
    }, now_s=NOW)
    assert limits.requests == Reading(50, 12, 30.0)
    assert limits.tokens == Reading(40000, 38000, 1.0)  # input tokens when no total is sent
    assert limits.retry_after_s == 30.0


def test_retry_after_ms_wins_over_retry_after() -> None:
    limits = read_limits({"retry-after-ms": "1500", "Retry-After": "2"}, now_s=NOW)
    assert limits.retry_after_s == 1.5


def test_azure_minus_one_and_garbage_are_ignored_with_a_debug_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="throttle.adaptive"):
        limits = read_limits({"retry-after": "-1", "x-ratelimit-remaining-requests": "-1",
                              "x-ratelimit-remaining-tokens": "lots",
                              "x-ratelimit-reset-tokens": "soon"}, now_s=NOW)
    assert limits.requests.empty and limits.tokens.empty and limits.retry_after_s is None
    assert "retry-after='-1' ignored" in caplog.text


def test_absent_headers_report_nothing() -> None:
    limits = read_limits({"content-type": "application/json"}, now_s=NOW)
    assert limits.requests.empty and limits.tokens.empty and limits.retry_after_s is None


@pytest.mark.parametrize("style", ["openai", "anthropic"])
def test_the_stubs_hidden_limits_read_back_as_what_they_are(style: str) -> None:
    hidden = HiddenLimits()
    for i in range(3):
        fits, headers = hidden.check(NOW + i / 10, 100, 3, 1000, 2.0, style)  # type: ignore[arg-type]
        assert fits
    assert read_limits(headers, now_s=NOW + 0.2).requests == Reading(3, 0, pytest.approx(1.8))
    fits, headers = hidden.check(NOW + 0.3, 100, 3, 1000, 2.0, style)  # type: ignore[arg-type]
    assert not fits
    limits = read_limits(headers, now_s=NOW + 0.3)
    assert limits.tokens.limit == 1000 and limits.tokens.remaining == 700
    # OpenAI's 429 says retry-after-ms; Anthropic's only retry-after, whole seconds rounded up.
    assert limits.retry_after_s == (pytest.approx(1.7, abs=0.01) if style == "openai" else 2)
    assert hidden.check(NOW + 2.01, 100, 3, 1000, 2.0, "none") == (True, {})


def test_the_stubs_anthropic_resets_are_whole_seconds_never_before_the_real_reset() -> None:
    hidden = HiddenLimits()
    _, headers = hidden.check(NOW + 0.25, 100, 3, 0, 2.0, "anthropic")
    assert headers["anthropic-ratelimit-requests-reset"] == "2026-12-04T10:00:03Z"  # 2.25 s up
    assert "retry-after-ms" not in headers
