"""Worker bootsteps: keep delayed calls on time, and re-publish calls the broker lost.

kombu's event loop fires at most 10 due timers per pass and then, with nothing else to
do, may sleep up to a second (celery#5927). A burst of reserved slots coming due together
is exactly that case: calls would run up to 1 s late, and lateness at the gate becomes
waiting for everybody behind. `FireDueTimers` lets the loop fire every due timer per pass.

`ReapLostCalls` runs `throttle.recovery.reap` every second for the tools whose queues the
worker consumes.

`GiveBackRevokedCalls` makes revoked tool calls give back their slots, leases and registry
entries as soon as they are revoked (see throttle/revocation.py).

`RestoreLostMessages` gives workers without kombu's event loop (gevent, eventlet) the
periodic sweep for messages of lost workers that the loop runs.

`SizePools` sizes the broker's, the producers', the result backend's and the gate's
connection pools for the node's concurrency (see throttle/pools.py) before it connects.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

from celery import bootsteps, signals
from kombu.asynchronous.hub import Hub

from throttle import recovery, reload, revocation
from throttle.pools import connections_for, size_pools

if TYPE_CHECKING:
    from throttle.owner import Owner

logger = logging.getLogger("throttle")

MAX_TIMERS_PER_PASS = 100_000
RESTORE_EVERY_S = 10.0  # kombu's unacked_restore_interval default


class FireDueTimers(bootsteps.StartStopStep):  # type: ignore[misc]
    """Make the worker's hub fire all due timers in one pass."""

    requires = ("celery.worker.components:Hub",)

    def create(self, worker: Any) -> None:
        hub = getattr(worker, "hub", None)
        if isinstance(hub, Hub):
            hub.fire_timers = functools.partial(  # type: ignore[method-assign]
                Hub.fire_timers, hub, max_timers=MAX_TIMERS_PER_PASS
            )


class SizePools(bootsteps.Step):  # type: ignore[misc]
    """Size every connection pool of the node for its concurrency (or autoscale maximum)."""

    requires = ("celery.worker.components:Pool",)

    owner: ClassVar[Owner | None] = None

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        if self.owner is None:
            return
        concurrency = max(int(worker.concurrency or 1), int(worker.max_concurrency or 0))
        with worker.app.connection_for_write() as connection:  # not connected: no I/O
            redis_broker = connection.transport.driver_type == "redis"
        for problem in size_pools(worker.app.conf, concurrency, redis_broker=redis_broker):
            logger.warning("throttle: %s", problem)
        self.owner.size_gate_pool(connections_for(concurrency))


class _TimerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of its Throttle (`owner`) that runs on the worker's timer until it stops."""

    requires = ("celery.worker.components:Timer",)
    owner: ClassVar[Owner | None] = None

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._timer: Any = None

    def stop(self, worker: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class RestoreLostMessages(_TimerStep):
    """On a worker without kombu's event loop (gevent, eventlet), sweep on a timer for the
    messages lost workers left unacked.

    kombu's Redis transport restores those messages (older than the visibility timeout) from
    an event-loop timer. A worker without the loop sweeps only when a poll finds nothing,
    which a busy node rarely does: on gevent nodes, messages a killed node held were still
    unacked 15 s after the burst had ended.
    """

    def start(self, worker: Any) -> None:
        if worker.use_eventloop or self.owner is None:
            return
        options = worker.app.conf.broker_transport_options or {}
        interval_s = float(options.get("unacked_restore_interval") or RESTORE_EVERY_S)
        self._timer = worker.timer.call_repeatedly(interval_s, self._sweep, (worker,))

    @staticmethod
    def _sweep(worker: Any) -> None:
        task_consumer = getattr(getattr(worker, "consumer", None), "task_consumer", None)
        channel: Any = getattr(task_consumer, "channel", None)
        restore = getattr(getattr(channel, "qos", None), "restore_visible", None)
        # Only Redis channels keep unacked messages to restore (their limit may be None).
        if restore is None or not hasattr(channel, "unacked_restore_limit"):
            return
        try:
            restore(num=channel.unacked_restore_limit, interval=1)
        except Exception:  # never let the sweep stop the worker's timer
            logger.warning("throttle: sweeping for messages of lost workers failed",
                           exc_info=True)


class ReapLostCalls(_TimerStep):
    """Every second, re-publish lost calls of the tools this worker serves."""

    def start(self, worker: Any) -> None:
        throttle = self.owner
        if throttle is None:
            return
        consumed = set(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        tools = [
            tool.name for tool in throttle.config.tools.values()
            if tool.queue in consumed and tool.queue in worker.app.tasks  # served here
        ]
        if tools:
            self._timer = worker.timer.call_repeatedly(
                recovery.REAP_EVERY_S, self._reap, (throttle, tools)
            )

    @staticmethod
    def _reap(throttle: Owner, tools: list[str]) -> None:
        try:
            recovery.reap(throttle, tools)
        except Exception:  # never let the reaper stop the worker's loop
            logger.exception("throttle: reaping lost calls failed")


class GiveBackRevokedCalls(_TimerStep):
    """Give back what revoked tool calls hold; discard held ones as soon as revoked."""

    def start(self, worker: Any) -> None:
        if self.owner is None:
            return
        signals.task_revoked.connect(revocation.give_back, weak=False,
                                     dispatch_uid="throttle.revocation.give_back")
        signals.task_received.connect(revocation.check_on_arrival, weak=False,
                                      dispatch_uid="throttle.revocation.check_on_arrival")
        self._timer = worker.timer.call_repeatedly(
            revocation.CHECK_EVERY_S, self._check, (revocation.HeldCallChecker(),)
        )

    @staticmethod
    def _check(checker: revocation.HeldCallChecker) -> None:
        try:
            checker()
        except Exception:  # never let the check stop the worker's loop
            logger.exception("throttle: discarding revoked calls failed")


class ReloadOnHangup(bootsteps.StartStopStep):  # type: ignore[misc]
    """The worker's main process reloads the tools file on SIGHUP (throttle/reload.py),
    in place of Celery's own handler, which restarts the worker."""

    requires = ("celery.worker.components:Timer",)
    owner: ClassVar[Owner | None] = None

    def start(self, worker: Any) -> None:
        owner = self.owner
        if owner is None:
            return

        def install(**_: Any) -> None:  # after Celery installed its own handlers
            reload.install(owner.reload, f"worker {os.getpid()}")

        signals.worker_ready.connect(install, weak=False,
                                     dispatch_uid=f"throttle.reload.{id(owner)}")


def steps_for(owner: Owner) -> list[type]:
    """The worker steps of `owner`'s app, each bound to `owner` (same names as the classes,
    so a step's `requires` finds them)."""
    steps = (SizePools, FireDueTimers, ReapLostCalls, GiveBackRevokedCalls, RestoreLostMessages,
             ReloadOnHangup)
    return [
        type(step.__name__, (step,), {"owner": owner, "__module__": step.__module__})
        if hasattr(step, "owner") else step
        for step in steps
    ]
