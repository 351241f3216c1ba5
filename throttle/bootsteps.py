"""Worker bootsteps that keep delayed calls on time.

kombu's event loop fires at most 10 due timers per pass and then, with nothing else to
do, may sleep up to a second (celery#5927). A burst of reserved slots coming due together
is exactly that case: calls would run up to 1 s late, and lateness at the gate becomes
waiting for everybody behind. `FireDueTimers` lets the loop fire every due timer per pass.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import bootsteps
from kombu.asynchronous.hub import Hub

MAX_TIMERS_PER_PASS = 100_000


class FireDueTimers(bootsteps.StartStopStep):  # type: ignore[misc]
    """Make the worker's hub fire all due timers in one pass."""

    requires = ("celery.worker.components:Hub",)

    def create(self, worker: Any) -> None:
        hub = getattr(worker, "hub", None)
        if isinstance(hub, Hub):
            hub.fire_timers = functools.partial(  # type: ignore[method-assign]
                Hub.fire_timers, hub, max_timers=MAX_TIMERS_PER_PASS
            )
