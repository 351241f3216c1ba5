"""When a call is due: its deadline counts from then (throttle.results.due_at_s)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from throttle.results import due_at_s


def test_a_countdown_or_eta_moves_when_a_call_is_due_and_never_before_now() -> None:
    now = time.time()
    assert due_at_s(None, None) == pytest.approx(now, abs=0.5)
    assert due_at_s(30, None) == pytest.approx(now + 30, abs=0.5)
    assert due_at_s(-30, None) == pytest.approx(now, abs=0.5)
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert due_at_s(None, later) == pytest.approx(later.timestamp(), abs=0.01)
    assert due_at_s(None, later.isoformat()) == pytest.approx(later.timestamp(), abs=0.01)
    naive = later.replace(tzinfo=None)  # read as UTC, as Celery does with enable_utc
    assert due_at_s(None, naive) == pytest.approx(later.timestamp(), abs=0.01)
    assert due_at_s(None, datetime.now(UTC) - timedelta(hours=1)) == pytest.approx(now, abs=0.5)
    assert due_at_s(5, later) == pytest.approx(now + 5, abs=0.5)  # countdown wins


def test_an_eta_that_is_not_a_time_says_so() -> None:
    with pytest.raises(ValueError, match="not an ISO 8601 time; pass a datetime"):
        due_at_s(None, "tomorrow")
