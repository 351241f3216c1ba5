"""One INFO line per delay or fallback in the worker's log, in place of Celery's bare `ignored`.

A delayed or fallen-back call ends its delivery by raising Celery's `Ignore`, which Celery
logs as "Task tool.x[id] ignored". The worker logs instead why and for how long:

    Task tool.search_products[9f1c...] delayed 42.0 s (pool commerce_api/expensive)
    Task tool.search_products[9f1c...] fallback (deadline)

and a filter on Celery's trace logger drops the `ignored` line of that same call (it is
logged in the same thread right after), so each decision reads once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("throttle.decisions")
CELERY_TRACE_LOGGER = "celery.app.trace"

_last = threading.local()  # the id of the call this thread last logged a decision for


def describe(outcome: str, reason: str, wait_s: float, tool: Any) -> str:
    """`delayed 42.0 s (pool commerce_api/expensive)`, `fallback (deadline)`."""
    why = reason
    if reason == "pool" and getattr(tool, "pool", None):
        why = f"pool {tool.pool}/{tool.priority}"
    if outcome == "delay":
        return f"delayed {wait_s:.1f} s ({why})"
    return f"{outcome} ({why})"


def log_decision(task: Any, outcome: str, reason: str, wait_s: float) -> None:
    """Log a delay or a fallback of `task`'s current call at INFO."""
    if outcome == "admit":
        return  # Celery logs the run ("received", "succeeded")
    request = task.request
    logger.info("Task %s[%s] %s", task.name, request.id,
                describe(outcome, reason, wait_s, task.tool))
    _last.call_id = request.id


class DropIgnoredAfterDecision(logging.Filter):
    """Drops Celery's "Task ...[id] ignored" line for a call whose decision was just logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if not isinstance(data, dict) or data.get("description") != "ignored":
            return True
        call_id = getattr(_last, "call_id", None)
        if call_id is None or data.get("id") != call_id:
            return True
        _last.call_id = None
        return False


def install() -> None:
    """Put the filter on Celery's trace logger (once per process)."""
    trace = logging.getLogger(CELERY_TRACE_LOGGER)
    if not any(isinstance(f, DropIgnoredAfterDecision) for f in trace.filters):
        trace.addFilter(DropIgnoredAfterDecision())
