"""Revoked calls give back what they hold at the gate: reservation, lease, registry entry
(and leave the count of waiting calls).

Celery discards a revoked call when its message arrives, when a held (ETA) call comes due,
or at once for `terminate=True` on a running call, and each time sends `task_revoked`;
`give_back` answers that signal for tool tasks. A delayed call is held by a worker until its
slot, so Celery alone would discard it (and free its slot) only when the slot has come,
too late for anyone to use it. `discard_revoked_held_calls`, run by a worker timer, lets
Celery discard held tool calls as soon as they are revoked (by id or by stamped header),
which sends the signal, stores the REVOKED result and acks the message right away. The
freed slot then goes to the next new call (docs/gate.md, "Released slots are reused").
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state as worker_state

from throttle.errors import InvalidToolCall, StoreUnavailable
from throttle.monitor import metrics
from throttle.task import ThrottledTask

logger = logging.getLogger("throttle")

CHECK_EVERY_S = 0.1


def give_back(sender: Any = None, request: Any = None, terminated: bool = False,
              **_: Any) -> None:
    """`task_revoked` receiver: free a revoked tool call's reservation, lease and registry
    entry. A call admitted before the revoke keeps its place in the windows (it ran)."""
    if not isinstance(sender, ThrottledTask) or request is None:
        return
    tool = sender.tool
    kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
    key = kwargs.get(tool.key) if tool.key else None
    gate = sender.throttle.gate
    metrics.observe_revoked(sender, request.id)
    try:
        freed = gate.release(tool.name, request.id, key=key)
        if tool.concurrency is not None:
            gate.finish(tool.name, request.id, key=key)
        if sender.throttle.register_calls:
            gate.forget_call(tool.name, request.id)
    except (StoreUnavailable, InvalidToolCall) as exc:
        logger.warning("tool %s: revoked call %s not given back (%s); its reservation "
                       "expires on its own", tool.name, request.id, exc)
        return
    logger.info("tool %s: revoked call %s gave back %s", tool.name, request.id,
                "its reserved slot" if freed else "what it held" if terminated else "nothing")


def check_on_arrival(sender: Any = None, request: Any = None, **_: Any) -> None:
    """`task_received` receiver: Celery checks a new message's id against the revoked
    ones, but not its stamped headers; a held call revoked by header is discarded now."""
    if worker_state.revoked_stamps and isinstance(getattr(request, "task", None), ThrottledTask):
        request.revoked()


class HeldCallChecker:
    """Discards held tool calls revoked since the last check (cheap when none were)."""

    def __init__(self) -> None:
        self._seen: tuple[Any, ...] = ()

    def __call__(self) -> int:
        """Discard the held tool calls that are revoked now; returns how many."""
        revocations = _revocations()
        if revocations == self._seen:
            return 0
        self._seen = revocations
        revoked, by_stamp = worker_state.revoked, bool(worker_state.revoked_stamps)
        discarded = 0
        for request in list(worker_state.scheduled_requests):
            maybe = request.id in revoked or (by_stamp and request.stamped_headers)
            # revoked() does Celery's full check and, if so, discards the call.
            if maybe and isinstance(request.task, ThrottledTask) and request.revoked():
                discarded += 1
        return discarded


def _revocations() -> tuple[Any, ...]:
    """What identifies the worker's current set of revocations (ids and stamped headers)."""
    revoked = worker_state.revoked
    data = getattr(revoked, "_data", None)
    newest = next(reversed(data), None) if isinstance(data, dict) else None
    stamps = tuple((name, repr(value)) for name, value in worker_state.revoked_stamps.items())
    return len(revoked), newest, stamps
