"""Celery's consumer, kept alive when the broker's Redis dies under it.

When the broker's Redis dies while a worker is polling it, kombu tears the Redis transport
down but can leave its channel open. Anything that touches that channel afterwards (Celery
closing it before reconnecting, or acking a call that was running during the outage) raises
AttributeError on the missing transport. Celery treats that as unrecoverable and the worker
exits, so one broker restart could stop every worker of a tool at once. This consumer logs
those cases and carries on. The messages the dead channel held stay unacked in Redis: kombu
restores them after the visibility timeout, and the reaper (throttle/recovery.py)
re-publishes delayed calls sooner. (With RabbitMQ, acks on a closed connection are skipped
the same way; the broker requeues those messages when the connection dies.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger("throttle")


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, minus the exits on a channel whose transport is gone."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as close_error:
            logger.warning(
                "throttle: the broken broker connection could not be closed (%r); reconnecting "
                "without it. Messages it held return after the visibility timeout.", close_error
            )

    def call_soon_ack(self, p: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return super().call_soon_ack(functools.partial(_unless_transport_gone, p), *args, **kwargs)


def _unless_transport_gone(ack: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Ack or reject a message, unless the transport it came on has been closed since."""
    message = getattr(ack, "__self__", None)
    transport = getattr(getattr(message, "channel", None), "connection", None)
    if transport is not None and getattr(transport, "client", True) is None:
        logger.warning(
            "throttle: message %s came on a broker connection that was lost; it cannot be "
            "acked or rejected now, and the broker delivers it again (RabbitMQ at once, "
            "Redis after the visibility timeout)",
            getattr(message, "delivery_tag", "?"),
        )
        return None
    return ack(*args, **kwargs)
