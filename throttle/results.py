"""Reading a call's result: tool answer or fallback, and when a call is due."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

from celery.result import AsyncResult

FALLBACK_MARK = "throttle: fallback"


def due_at_s(countdown: float | None, eta: datetime | str | None) -> float:
    """When a call sent now with Celery's `countdown` / `eta` is due (countdown wins, as in
    Celery; never before now); a naive `eta` is read as UTC."""
    now_s = time.time()
    if countdown:
        return now_s + max(0.0, float(countdown))
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            raise ValueError(f"eta {eta!r} is not an ISO 8601 time; pass a datetime") from None
    if isinstance(eta, datetime):
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=UTC)
        return max(now_s, eta.timestamp())
    return now_s


def outcome(result: AsyncResult) -> Literal["result", "fallback"]:
    """Whether a finished call's `.get()` returned the tool's answer or its fallback.

    A fallback is a normal SUCCESS (chains, chords and callbacks receive it) whose stored
    `traceback` field reads "throttle: fallback (<reason>)"; `fallback_reason` reads it.
    """
    return "fallback" if fallback_reason(result) is not None else "result"


def fallback_reason(result: AsyncResult) -> str | None:
    """The reason a call fell back ('deadline', 'store_unavailable', ...), or None."""
    mark = result.traceback
    if isinstance(mark, str) and mark.startswith(FALLBACK_MARK):
        return mark[len(FALLBACK_MARK) :].strip(" ()")
    return None
