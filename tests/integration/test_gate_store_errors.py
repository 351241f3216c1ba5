"""When Redis does not answer, the gate raises StoreUnavailable quickly, naming the URL but
never its password. Real sockets on 127.0.0.1: a port where nothing listens, and a listener
that accepts connections and never replies.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from throttle import AsyncGate, Gate, StoreUnavailable, load_config

pytestmark = pytest.mark.redis

CONFIG = load_config({"tools": {"t": {"limits": ["5/60s"], "max_delay": "10m"}}})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SilentServer:
    """A port that accepts connections and never sends a byte; it counts the connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            self.connections.append(connection)

    def accepted(self) -> int:
        """Connections accepted so far (after giving the accept loop a moment)."""
        time.sleep(0.3)
        return len(self.connections)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for connection in self.connections:
            connection.close()
        self.listener.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def raise_store_unavailable(gate: Gate) -> tuple[StoreUnavailable, float]:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        gate.acquire("t", "m1")
    return caught.value, time.monotonic() - started


def test_a_port_where_nothing_listens_raises_store_unavailable_naming_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    gate = Gate(url, CONFIG, prefix="throttle-test", socket_timeout_s=5.0)
    error, elapsed = raise_store_unavailable(gate)
    assert elapsed < 5.0  # a refused connection is reported at once, not after the timeout
    assert url in str(error)
    assert error.url == url
    assert isinstance(error.__cause__, redis.ConnectionError)
    with pytest.raises(StoreUnavailable, match=re.escape(url)):
        gate.release("t", "m1")


@pytest.mark.parametrize(
    "userinfo", ["user:secret@", ":secret@", "default:secret@"], ids=["user", "no-user", "default"]
)
def test_a_password_in_the_url_never_shows_in_the_error(userinfo: str) -> None:
    port = free_port()
    gate = Gate(f"redis://{userinfo}127.0.0.1:{port}/0", CONFIG, prefix="throttle-test")
    error, _ = raise_store_unavailable(gate)
    for text in (str(error), repr(error), error.url, *map(str, error.args), gate.url):
        assert "secret" not in text
    assert f"127.0.0.1:{port}" in str(error)
    assert "***" in str(error)


def test_a_password_in_the_query_string_never_shows_in_the_error() -> None:
    gate = Gate(
        f"redis://127.0.0.1:{free_port()}/0?password=secret", CONFIG, prefix="throttle-test"
    )
    error, _ = raise_store_unavailable(gate)
    assert "secret" not in str(error)


TIMEOUT_S = 0.5


def test_a_server_that_never_answers_raises_within_the_socket_timeout_and_never_retries(
    silent: SilentServer,
) -> None:
    """One connection, given up after the socket timeout: a retry would open a second one
    and take at least twice the timeout."""
    url = f"redis://127.0.0.1:{silent.port}/0"
    gate = Gate(url, CONFIG, prefix="throttle-test", socket_timeout_s=TIMEOUT_S)
    error, elapsed = raise_store_unavailable(gate)
    assert silent.accepted() == 1
    assert TIMEOUT_S * 0.9 < elapsed < 2 * TIMEOUT_S
    assert url in str(error)
    assert isinstance(error.__cause__, redis.TimeoutError)


def test_the_async_gate_raises_within_the_socket_timeout_and_never_retries_too(
    silent: SilentServer,
) -> None:
    url = f"redis://127.0.0.1:{silent.port}/0"

    async def attempt() -> float:
        gate = AsyncGate(url, CONFIG, prefix="throttle-test", socket_timeout_s=TIMEOUT_S)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable, match=re.escape(url)):
                await gate.acquire("t", "m1")
            return time.monotonic() - started
        finally:
            await gate.aclose()

    elapsed = asyncio.run(attempt())
    assert silent.accepted() == 1
    assert TIMEOUT_S * 0.9 < elapsed < 2 * TIMEOUT_S


def test_a_gate_over_a_client_names_its_address_without_the_password() -> None:
    port = free_port()
    client = redis.Redis(
        host="127.0.0.1", port=port, password="secret", retry=Retry(NoBackoff(), 0)
    )
    gate = Gate(client, CONFIG, prefix="throttle-test")
    error, _ = raise_store_unavailable(gate)
    assert f"redis://127.0.0.1:{port}/0" in str(error)
    assert "secret" not in str(error)
