"""The worker's consumer skips acks on a transport that has been closed, instead of raising
(kombu's Redis transport raised AttributeError there, which made Celery exit the worker)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from throttle.consumer import _unless_transport_gone


def received(connection: Connection) -> Any:
    queue = Queue("consumer-test", Exchange("consumer-test"), "consumer-test")
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="consumer-test",
                         declare=[queue])
    message = connection.SimpleQueue(queue).get(timeout=1)
    assert message is not None
    return message


def test_an_ack_on_a_live_connection_acks() -> None:
    with Connection("memory://") as connection:
        message = received(connection)
        _unless_transport_gone(message.ack_log_error, logging.getLogger(), ())
        assert message.acknowledged


def test_an_ack_on_a_closed_transport_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connection = Connection("memory://")
    message = received(connection)
    # The state kombu's Redis transport leaves after its server died mid-poll: the transport
    # torn down, the channel never closed.
    connection._do_close_transport()
    assert message.channel.connection.client is None
    with caplog.at_level(logging.WARNING, logger="throttle"):
        assert _unless_transport_gone(message.ack_log_error, logging.getLogger(), ()) is None
    assert not message.acknowledged
    assert "came on a broker connection that was lost" in caplog.text
