"""Eager mode (`task_always_eager = True`): a call waits for its slot in the caller's process.

On a worker a delayed call is re-published with a countdown. Run eagerly, that re-publish
would run the call again inside itself until the stack overflows. Instead the task raises
`WaitEagerly`, and `apply` sleeps out the wait and runs the call again with the same id
(its reservation is honoured) in a loop, never recursing. A fallback raises `FallBackEagerly`
and `apply` returns an `EagerResult` in state SUCCESS holding the tool's fallback, marked
as worker results are, so `outcome()` and `fallback_reason()` read it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore
from celery.result import EagerResult
from kombu.utils.uuid import uuid

# A call is asked about at most this many times; the gate's deadline ends it long before.
MAX_RUNS = 1_000


class WaitEagerly(Ignore):  # type: ignore[misc]
    """Raised inside an eager call that must wait `wait_s` and then run again."""

    def __init__(self, wait_s: float, reason: str) -> None:
        super().__init__(f"waiting {wait_s:.3f}s in-process ({reason})")
        self.wait_s = wait_s


class FallBackEagerly(Ignore):  # type: ignore[misc]
    """Raised inside an eager call that falls back; `apply` turns it into the result."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"fallback ({reason})")
        self.reason = reason


def apply(
    task: Task,
    run_once: Callable[..., EagerResult],
    args: Any,
    kwargs: Any,
    *,
    headers: dict[str, Any],
    fallback_mark: str,
    **options: Any,
) -> EagerResult:
    """Run `task` in this process until it ends: sleep out each wait, then ask again.

    `run_once` is Celery's `Task.apply`; `headers` carry the call's first-enqueue time.
    """
    task_id = options.pop("task_id", None) or uuid()
    for _ in range(MAX_RUNS):
        result = run_once(args, kwargs, headers=headers, task_id=task_id, **options)
        outcome = result.result
        if isinstance(outcome, WaitEagerly):
            time.sleep(outcome.wait_s)
            continue
        if isinstance(outcome, FallBackEagerly):
            return _fallback_result(task, result.id, outcome.reason, fallback_mark, options)
        return result
    return _fallback_result(task, task_id, "deadline", fallback_mark, options)


def _fallback_result(
    task: Task, task_id: str, reason: str, fallback_mark: str, options: dict[str, Any]
) -> EagerResult:
    mark = f"{fallback_mark} ({reason})"
    value = task.tool.fallback
    ignore_result = options.get("ignore_result", task.ignore_result)
    if task.app.conf.task_store_eager_result and not ignore_result:
        task.backend.store_result(task_id, value, states.SUCCESS, traceback=mark)
    return EagerResult(task_id, value, states.SUCCESS, traceback=mark, name=task.name)
