"""RabbitMQ for the tests that use it as the broker: skip where it does not answer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from kombu import Connection

AMQP_URL = os.environ.get("THROTTLE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@contextmanager
def rabbitmq_queue(queue: str) -> Iterator[str]:
    """RabbitMQ's URL, with `queue` deleted before and after (the test skips if it is absent)."""
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.skip(f"RabbitMQ does not answer at {AMQP_URL} ({exc}); `make test` starts it")

    def drop() -> None:
        with Connection(AMQP_URL) as conn:
            conn.default_channel.queue_delete(queue)

    drop()
    try:
        yield AMQP_URL
    finally:
        drop()
