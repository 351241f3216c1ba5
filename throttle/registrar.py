"""Registering `.delay()`'s calls off the caller's path: a per-gate queue and a sender thread.

`.delay()` queues the call's registration (throttle/recovery.py) and returns once the call
is published; a background thread (a greenlet under gevent or eventlet) sends what is
queued, pipelined: one round trip per batch. The thread gathers a batch for `LINGER_S`
first: woken for each call, it would contend for the GIL with the caller's own publish. A
failed batch is logged as each call not registered, as a synchronous registration is. A full
queue is refused (the caller registers itself); nothing is dropped silently.

A call may be decided by the gate before its registration arrives: acquire.lua then notes
it as decided, and register.lua drops the late registration, so the reaper never publishes
a decided call again. That note lasts 120 s (acquire.lua's DECIDED_MS); a registration
queued for longer than `LATE_S` is not sent (it is logged as not registered) so none lands
after its note expired. `withdraw` (a publish that failed) takes a call back out of the
queue, or waits for the batch it is in, so the caller's forget comes after it.

The queue is flushed at exit (`atexit`, and Celery's process shutdown signals, see
throttle/sending.py); a forked child starts with an empty queue (its parent sends what it
had queued) and a thread of its own. A process that dies before its queue is sent loses
those registrations: their calls are published, but not recoverable if the broker loses
them too.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

logger = logging.getLogger("throttle")

MOST_QUEUED = 10_000  # past this `.delay()` registers the call itself
MOST_PER_BATCH = 500
LATE_S = 30.0  # a registration queued longer is not sent (acquire.lua keeps 120 s)
LINGER_S = 0.01  # the thread gathers a batch this long before sending it
IDLE_S = 60.0  # the sender thread ends after this long without work (made again on demand)
FLUSH_S = 10.0  # the most `flush_all` waits at exit for a registrar's batch in flight


class Pending(NamedTuple):
    """One queued registration (see `Gate.register_call`)."""

    tool: str
    member: str
    message: str
    check_at_s: float
    queued_at: float  # time.monotonic()


# Sends a batch; the error of each registration that failed, None for each that did not.
Send = Callable[[Sequence[Pending]], Sequence[Exception | None]]


def not_registered(tool: str, member: str, reason: object) -> None:
    """Log a call published without its registration."""
    logger.error("tool %s: call %s is enqueued but not registered for recovery (%s): "
                 "a worker answers it as on_store_error says, but if the broker loses "
                 "its message nothing publishes it again", tool, member, reason)


class Registrar:
    """The queue of one gate's registrations and the thread that sends them."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._reset()
        _registrars.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[tuple[str, str], Pending] = {}
        self._sending: dict[tuple[str, str], int] = {}  # in batches being sent
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread waits for a call

    def submit(self, tool: str, member: str, message: str, check_at_s: float) -> bool:
        """Queue a registration; False when the queue is full (register it yourself)."""
        item = Pending(tool, member, message, check_at_s, time.monotonic())
        with self._cond:
            if len(self._pending) >= MOST_QUEUED:
                return False
            self._pending[tool, member] = item
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="throttle-registrar",
                                                daemon=True)
                self._thread.start()
            elif self._idle:
                self._cond.notify()
        return True

    def withdraw(self, tool: str, member: str, timeout_s: float = FLUSH_S) -> None:
        """Take a call's registration out of the queue, or wait until the batch it is in
        has been sent (so a forget sent next comes after it)."""
        key = (tool, member)
        with self._cond:
            self._pending.pop(key, None)
            self._cond.wait_for(lambda: key not in self._sending, timeout_s)

    def flush(self, timeout_s: float = FLUSH_S) -> None:
        """Send everything queued now (in this thread) and wait for the batches in flight."""
        while batch := self._take():
            self._send_batch(batch)
        with self._cond:
            self._cond.wait_for(lambda: not self._sending, timeout_s)

    def queued(self) -> int:
        """How many registrations wait to be sent."""
        with self._cond:
            return len(self._pending)

    def _take(self) -> list[Pending]:
        with self._cond:
            keys = list(self._pending)[:MOST_PER_BATCH]
            batch = [self._pending.pop(key) for key in keys]
            for key in keys:
                self._sending[key] = self._sending.get(key, 0) + 1
        return batch

    def _run(self) -> None:
        """Gather for LINGER_S, send, and again while calls come; wait when none do."""
        me = threading.current_thread()
        self._linger()  # made for a call just queued
        while True:
            with self._cond:
                if self._thread is not me:  # replaced after a fork
                    return
                idle = not self._pending
                if idle:
                    self._idle = True
                    woken = self._cond.wait(IDLE_S)
                    self._idle = False
                    if not woken and not self._pending:
                        self._thread = None
                        return
            if idle:
                self._linger()
            if batch := self._take():
                self._send_batch(batch)
            self._linger()  # the next batch: most likely, calls go on coming

    def _linger(self) -> None:
        if LINGER_S and self.queued() < MOST_PER_BATCH:  # (a backlog goes at once)
            time.sleep(LINGER_S)

    def _send_batch(self, batch: list[Pending]) -> None:
        late = time.monotonic() - LATE_S
        timely = [item for item in batch if item.queued_at >= late]
        for item in batch:
            if item.queued_at < late:
                not_registered(item.tool, item.member, f"its registration waited over "
                               f"{LATE_S:g} s in this process")
        try:
            errors: Sequence[Exception | None] = self._send(timely) if timely else []
        except Exception as exc:  # not a store error: log it, the thread goes on
            logger.exception("registering %d calls failed", len(timely))
            errors = [exc] * len(timely)
        finally:
            with self._cond:
                for item in batch:
                    key = (item.tool, item.member)
                    left = self._sending.pop(key) - 1
                    if left:
                        self._sending[key] = left
                self._cond.notify_all()
        for item, error in zip(timely, errors, strict=True):
            if error is not None:
                not_registered(item.tool, item.member, error)


_registrars: weakref.WeakSet[Registrar] = weakref.WeakSet()


def flush_all(timeout_s: float = FLUSH_S, **_: object) -> None:
    """Send every registrar's queue (at exit; also a Celery signal receiver)."""
    for registrar in list(_registrars):
        registrar.flush(timeout_s)


def _after_fork_in_child() -> None:
    for registrar in list(_registrars):
        registrar._reset()  # the parent sends what was queued


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(flush_all)
