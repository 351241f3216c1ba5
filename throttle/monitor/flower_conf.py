"""Flower's settings file for `throttle flower` (passed as `--conf`; Flower executes it).

Task pages list only the fields Flower knows; this adds the ones throttle's
`task-delayed` and `task-fallback` events carry: the last decision as the worker logs it
("delayed 42.0 s (pool api/standard)"), its reason and wait, how often the call was
delayed, and when it was first sent (re-publishing keeps that time).
"""

from __future__ import annotations

from typing import Any

CALL_FIELDS = ("decision", "reason", "wait_s", "delays", "first_sent")


def format_task(task: Any) -> Any:
    """Flower's `format_task` hook: show the call's throttle fields on its task page."""
    extra = tuple(name for name in CALL_FIELDS if getattr(task, name, None) is not None)
    if extra:
        task._fields = (*type(task)._fields, *extra)
    return task
