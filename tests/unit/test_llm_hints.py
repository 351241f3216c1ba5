"""Reading an upstream's pause request: Retry-After, retry-after-ms, x-ratelimit-reset-*."""

from __future__ import annotations

import email.utils

import pytest

from throttle.stub.behaviour import go_duration, pause_headers
from workers.tools.retry_hints import duration_s, pause_s, retry_after_s

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("1h2m3.5s", 3723.5),
        ("20ms", 0.02),
        ("0s", 0.0),
        ("3", 3.0),
        ("0.5", 0.5),
        ("750us", 0.00075),
        ("1m", 60.0),
    ],
)
def test_durations_read_as_go_style_text_or_bare_seconds(text: str, seconds: float) -> None:
    assert duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5x", "1.5s garbage", "-1s", "-3", "nan", "inf"])
def test_text_that_is_not_a_duration_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="duration such as"):
        duration_s(text)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s("3", now_s=NOW) == 3.0
    assert retry_after_s(" 120 ", now_s=NOW) == 120.0
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert retry_after_s(date, now_s=NOW) == pytest.approx(30.0)
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    assert retry_after_s(past, now_s=NOW) == 0.0
    with pytest.raises(ValueError, match="neither seconds nor an HTTP date"):
        retry_after_s("tomorrow", now_s=NOW)


def test_the_most_precise_hint_wins() -> None:
    headers = {"retry-after-ms": "1500", "Retry-After": "2", "x-ratelimit-reset-requests": "9s"}
    assert pause_s(headers, now_s=NOW) == 1.5
    assert pause_s({"Retry-After": "2", "x-ratelimit-reset-requests": "9s"}, now_s=NOW) == 2.0
    assert pause_s({"RETRY-AFTER": "4"}, now_s=NOW) == 4.0


def test_only_the_exhausted_limits_reset_counts_when_the_upstream_says_which() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s",
        "x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "6m0s",
    }
    assert pause_s(headers, now_s=NOW) == 1.5
    headers["x-ratelimit-remaining-tokens"] = "0"
    assert pause_s(headers, now_s=NOW) == 360.0


def test_without_remaining_counts_the_longest_reset_counts() -> None:
    headers = {"x-ratelimit-reset-requests": "250ms", "x-ratelimit-reset-tokens": "2s"}
    assert pause_s(headers, now_s=NOW) == 2.0


def test_a_reset_given_as_a_unix_time_becomes_a_delay() -> None:
    assert pause_s({"x-ratelimit-reset-requests": str(int(NOW + 12))}, now_s=NOW) == 12.0


def test_unreadable_hints_are_skipped_and_no_hint_is_none() -> None:
    assert pause_s({"Retry-After": "later", "x-ratelimit-reset-tokens": "3s"}, now_s=NOW) == 3.0
    assert pause_s({"Retry-After": "later"}, now_s=NOW) is None
    assert pause_s({"content-type": "application/json"}, now_s=NOW) is None


@pytest.mark.parametrize("seconds", [0.25, 1.5, 3.0, 59.0, 360.0, 3723.5])
def test_the_stub_s_durations_read_back_exactly(seconds: float) -> None:
    assert duration_s(go_duration(seconds)) == pytest.approx(seconds)
    assert go_duration(360.0) == "6m0s"


@pytest.mark.parametrize("style", ["seconds", "ms", "date", "reset"])
def test_every_pause_style_the_stub_sends_is_understood(style: str) -> None:
    seconds = pause_s(pause_headers(3.0, style, NOW), now_s=NOW)
    assert seconds == pytest.approx(3.0, abs=1.0 if style == "date" else 1e-9)
