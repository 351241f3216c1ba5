"""RabbitMQ for the tests that use it as the broker.

Only an unreachable server is a skip (a failure in CI, see `tests/support/needs.py`): once the
port answers, bad credentials, a missing vhost or a refused queue fail the test like any error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from kombu import Connection

from tests.support.needs import missing

AMQP_URL = os.environ.get("THROTTLE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def address(url: str = AMQP_URL) -> tuple[str, int]:
    """The (host, port) of an AMQP URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def with_port(url: str, port: int) -> str:
    """`url` (credentials and vhost kept) pointing at 127.0.0.1:`port`, e.g. a relay."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else
                                     f"127.0.0.1:{port}"))


def require_rabbitmq(url: str = AMQP_URL) -> None:
    """Skip (fail in CI) when nothing listens at the URL's address; otherwise return."""
    try:
        socket.create_connection(address(url), timeout=3).close()
    except OSError as exc:
        missing(f"RabbitMQ does not answer at {address(url)} ({exc})",
                "run the tests with `make test` (it installs and starts RabbitMQ) or point "
                "THROTTLE_AMQP_URL at a running server")


def delete_queues(queues: Iterable[str]) -> None:
    """Delete `queues` on the tests' RabbitMQ (absent ones are no error)."""
    with Connection(AMQP_URL, connect_timeout=3) as conn:
        for queue in queues:
            conn.default_channel.queue_delete(queue)


@contextmanager
def rabbitmq_queue(queue: str) -> Iterator[str]:
    """RabbitMQ's URL, with `queue` deleted before and after (workers still running then
    declare it again: `tests.support.workers.cluster` deletes its queues once they stopped)."""
    require_rabbitmq()
    delete_queues([queue])
    try:
        yield AMQP_URL
    finally:
        delete_queues([queue])
