"""What the worker observes about each call: counted in memory, flushed to Redis every second.

`throttle/task.py` calls the hooks (`throttle/revocation.py` the revoke's); they never raise
into the task and never make a Redis round trip of their own. Each process keeps one
`StatsBuffer` per `Throttle`; a daemon thread (started on first use, and again in a forked
child) writes them every `FLUSH_INTERVAL_S` in one pipeline, and once more when the process
ends (Celery's `worker_process_shutdown` / `worker_shutdown`, or `atexit`). `throttle
exporter` serves the totals to Prometheus, however many processes and hosts wrote them.

Each delay and fallback is logged at INFO with its reason and wait
(`throttle/monitor/decisions.py`), and sent as a Celery event (`task-delayed`, `task-fallback`)
when the worker sends task events (`-E` or `worker_send_task_events`): Flower shows a
waiting call as DELAYED, and a fallback (a success to Celery, followed by `task-succeeded`)
as SUCCESS with the fallback mark in its traceback field.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from celery import signals

from throttle.errors import StoreUnavailable
from throttle.headers import DELAYS, ENQUEUED_AT
from throttle.monitor import decisions
from throttle.monitor.stats import StatsBuffer
from throttle.monitor.tenants import tenant_label
from throttle.store import STORE_ERRORS

logger = logging.getLogger("throttle.monitor.metrics")

if TYPE_CHECKING:
    from celery import Celery

    from throttle.config import ToolConfig
    from throttle.owner import Owner


class Observed(Protocol):
    """A tool's task, as the hooks read it (they never raise if it is not one)."""

    tool: ToolConfig
    throttle: Owner
    app: Celery
    request: Any
    send_events: bool

    def send_event(self, type_: str, **fields: Any) -> None:
        """Send a Celery task event about the current call."""

FLUSH_INTERVAL_S = 1.0
EVENT_TYPES = {"delay": "task-delayed", "fallback": "task-fallback"}

_buffers: weakref.WeakKeyDictionary[Any, StatsBuffer] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_flushing = threading.Lock()  # one flush at a time: flush() returns once earlier counts landed
_flusher: threading.Thread | None = None
_stop = threading.Event()
_worker_task_events = False  # set from the worker's -E flag (see _note_task_events)
_limits_texts: dict[int, tuple[Any, str]] = {}  # id(tool) -> (tool, its limits as text)
_last_buffer: tuple[weakref.ref[Any], StatsBuffer] | None = None  # the last one `_buffer` found


def observe_decision(task: Observed, outcome: str, reason: str, wait_s: float,
                     tenant: Any = None, request: Any = None) -> None:
    """One gate decision for `task`'s call: admit, delay (waiting `wait_s`) or fallback;
    `tenant`, the call's fair_by value, counts an admission per tenant too. `request`: the
    task's current request, when the caller has it at hand."""
    if outcome != "admit":  # (Celery logs an admitted call's run)
        try:
            decisions.log_decision(task, outcome, reason, wait_s)
        except Exception:  # nor must its log line
            logger.debug("could not log a decision of %s", _name(task), exc_info=True)
    try:
        if request is None:
            request = task.request
        delays_before = _delays_before(request)
        buffer = _buffer(task)
        buffer.note_limits(task.tool.name, limits_text(task.tool))
        now_s = time.time()
        buffer.add_decision(task.tool.name, outcome, reason, wait_s, now_s,
                            call_id=None if delays_before is None else str(request.id),
                            delays_before=delays_before)
        if outcome == "admit" and tenant is not None:
            enqueued = getattr(request, ENQUEUED_AT, None)
            waited_s = now_s - enqueued if isinstance(enqueued, int | float) and not \
                isinstance(enqueued, bool) else 0.0
            buffer.add_tenant_admission(task.tool.name, tenant_label(tenant), waited_s, now_s)
        if outcome in EVENT_TYPES:
            _send_event(task, outcome, reason, wait_s)
    except Exception:  # metrics must never break a call
        logger.debug("could not count a decision of %s", _name(task), exc_info=True)


def _delays_before(request: Any) -> int | None:
    """How often this call was delayed before, from its header; None if the header is not a
    count (a message made by hand): the decision then counts, the call's waiting does not."""
    value = getattr(request, DELAYS, None) or 0
    if value.__class__ is int and value == 0:  # (most calls: never delayed)
        return 0 if getattr(request, "id", None) else None
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        count = int(value)
    except ValueError:
        return None
    return count if 0 <= count < 1_000_000 and getattr(request, "id", None) else None


def observe_revoked(task: Observed, call_id: str) -> None:
    """A revoked call of `task`'s: it no longer counts as waiting."""
    try:
        _buffer(task).forget_waiting(task.tool.name, call_id)
    except Exception:  # metrics must never break a revoke
        logger.debug("could not forget the revoked call %s", call_id, exc_info=True)


def limits_text(tool: Any) -> str:
    """A tool's limits as its config writes them ("100/1m, 1000/1h"); written once per tool
    object (a reload makes new ones), as every decision notes them."""
    cached = _limits_texts.get(id(tool))
    if cached is None or cached[0] is not tool:  # (the object is kept: its id stays its own)
        cached = _limits_texts[id(tool)] = (tool, ", ".join(str(limit) for limit in tool.limits))
    return cached[1]


def observe_run(task: Observed, status: str, seconds: float) -> None:
    """A body of `task` ran for `seconds` and ended with `status` ("success", "error", ...)."""
    try:
        _buffer(task).add_run(task.tool.name, status, seconds)
    except Exception:
        logger.debug("could not count a run of %s", _name(task), exc_info=True)


def observe_store_error(task: Observed) -> None:
    """The gate's store failed while deciding or finishing one of `task`'s calls."""
    try:
        _buffer(task).add_store_error(task.tool.name)
    except Exception:
        logger.debug("could not count a store error of %s", _name(task), exc_info=True)


def flush() -> None:
    """Write every pending count of this process now (a failed write is kept for later).

    Flushes run one at a time, so when this returns, every count added before the call is in
    Redis (or kept after a failed write), including those a flush already under way had taken.
    """
    with _flushing:
        with _lock:
            pending = list(_buffers.items())
        for throttle, buffer in pending:
            try:
                buffer.flush(throttle.gate.client)
            except (*STORE_ERRORS, StoreUnavailable) as exc:
                logger.debug("metrics flush to Redis failed (%s); kept for the next one", exc)
            except Exception:  # the flusher thread must outlive any surprise
                logger.warning("metrics flush failed", exc_info=True)


def _name(task: Any) -> str:
    return str(getattr(getattr(task, "tool", None), "name", task))


def _buffer(task: Observed) -> StatsBuffer:
    global _last_buffer
    throttle = task.throttle
    last = _last_buffer  # (every call counts twice: the lookup below makes a weakref each time)
    if last is not None and last[0]() is throttle and _flusher is not None:
        return last[1]
    buffer = _buffers.get(throttle)
    if buffer is None:
        with _lock:
            buffer = _buffers.setdefault(throttle, StatsBuffer(throttle.prefix))
    if _flusher is None:
        _start_flusher()
    _last_buffer = (weakref.ref(throttle), buffer)
    return buffer


def _start_flusher() -> None:
    global _flusher
    with _lock:
        if _flusher is not None:
            return
        _stop.clear()
        _flusher = threading.Thread(target=_flush_every_interval, name="throttle-metrics",
                                    daemon=True)
        _flusher.start()


def _flush_every_interval() -> None:
    while not _stop.wait(FLUSH_INTERVAL_S):
        flush()


def _after_fork_in_child() -> None:
    """A forked child starts with no flusher, fresh locks and nothing pending."""
    global _flusher, _flushing, _lock, _stop
    _flusher, _flushing, _lock, _stop = None, threading.Lock(), threading.Lock(), threading.Event()
    for buffer in list(_buffers.values()):
        buffer.clear()


def _send_event(task: Observed, outcome: str, reason: str, wait_s: float) -> None:
    """Tell Flower (and any event consumer) that a call was delayed or fell back."""
    if not task.send_events:
        return
    if not (_worker_task_events or task.app.conf.worker_send_task_events):
        return
    request = task.request
    delays = _delays_before(request) or 0
    fields: dict[str, Any] = {
        "outcome": outcome, "reason": reason, "wait_s": round(wait_s, 3),
        "decision": decisions.describe(outcome, reason, wait_s, task.tool),
        "delays": delays + (outcome == "delay"),
        "first_sent": _first_sent(request),
    }
    if outcome == "fallback":
        # Fields Flower's task view shows; the stored result carries the same mark.
        mark = f"throttle: fallback ({reason})"
        fields |= {"result": repr(task.tool.fallback), "traceback": mark}
    task.send_event(EVENT_TYPES[outcome], retry=False, **fields)


def _first_sent(request: Any) -> str | None:
    """When the call was first sent (its enqueue header), as UTC ISO-8601; None if unknown."""
    value = getattr(request, ENQUEUED_AT, None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return None


def _note_task_events(sender: Any = None, **_: Any) -> None:
    """Remember whether this worker sends task events (its -E flag), for its pool children."""
    global _worker_task_events
    _worker_task_events = bool(getattr(sender, "task_events", False))


def _flush_at_shutdown(**_: Any) -> None:
    flush()


decisions.install()
signals.worker_init.connect(_note_task_events, weak=False)
signals.worker_process_shutdown.connect(_flush_at_shutdown, weak=False)
signals.worker_shutdown.connect(_flush_at_shutdown, weak=False)
os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(flush)
