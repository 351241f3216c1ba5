"""AsyncGate's pipelined connection: a tick's calls go out behind the last tick's, unanswered.

Through a loopback relay to the real Redis that can hold the server's replies back or cut the
link: calls made while others are in flight reach the server before those are answered, on
the one connection; a link cut with calls in flight sends them again, each counted once; a
server that never answers fails every call in flight within one socket timeout; the
connection goes back to the pool once no call is in flight.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from tests.integration.test_gate_store_errors import SilentServer, silent  # noqa: F401
from tests.support.relay import Relay
from tests.support.reservations import reservations
from throttle import Action, AsyncGate, Decision, StoreUnavailable, load_config
from throttle.keys import keys_for

pytestmark = pytest.mark.redis

P = 1_700_000_000.0
CONFIG = load_config(
    {
        "tools": {
            "ten": {"limits": ["10/1s"], "max_delay": "1m"},
            "wide": {"limits": ["1000000/10m"], "max_delay": "1m"},
        }
    }
)
CALL_NAMES = (b"$5\r\nFCALL\r\n", b"$7\r\nEVALSHA\r\n")


class HoldingRelay(Relay):
    """A Relay that passes the server's replies on only while `passing` is set, and keeps
    what the gate sent, to count the script calls that reached the server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.passing = threading.Event()
        self.passing.set()
        self._sent = bytearray()
        self._sent_lock = threading.Lock()
        super().__init__(target_host, target_port)

    def _forward(self, data: bytes, replies: bool) -> bool:
        if replies:
            self.passing.wait(10)
        else:
            with self._sent_lock:
                self._sent += data
        return True

    def calls(self) -> int:
        """Script calls (FCALL or EVALSHA) sent to the server so far."""
        with self._sent_lock:
            return sum(self._sent.count(name) for name in CALL_NAMES)


@pytest.fixture
def relay(redis_url: str) -> Iterator[tuple[str, HoldingRelay]]:
    parts = urlsplit(redis_url)
    with HoldingRelay(parts.hostname or "127.0.0.1", parts.port or 6379) as held:
        yield parts._replace(netloc=f"127.0.0.1:{held.port}").geturl(), held


def pool_of(gate: AsyncGate) -> Any:
    return getattr(gate.client, "connection_pool")  # noqa: B009  # a single server


async def reached(relay: HoldingRelay, calls: int) -> int:
    """Wait (up to 5 s) until `calls` script calls reached the server; how many did."""
    deadline = time.monotonic() + 5
    while relay.calls() < calls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return relay.calls()


def test_calls_made_while_others_are_in_flight_reach_the_server_before_those_are_answered(
    relay: tuple[str, HoldingRelay], prefix: str
) -> None:
    url, held = relay

    async def run() -> tuple[int, list[Decision], int]:
        gate = AsyncGate(url, CONFIG, prefix=prefix)
        try:
            await gate.acquire("wide", "warm")  # (the library is loaded)
            sent = held.calls()
            held.passing.clear()
            first = [asyncio.ensure_future(gate.acquire("wide", f"a{i}")) for i in range(10)]
            await asyncio.sleep(0.2)  # written; their answers held back
            second = [asyncio.ensure_future(gate.acquire("wide", f"b{i}")) for i in range(10)]
            written = await reached(held, sent + 20) - sent
            held.passing.set()
            answers = await asyncio.gather(*first, *second)
            pool = pool_of(gate)
            return written, list(answers), len(pool._available_connections) + len(
                pool._in_use_connections)
        finally:
            held.passing.set()
            await gate.aclose()

    written, answers, opened = asyncio.run(run())
    assert written == 20  # the second tick's calls went out before the first's answers
    assert [d.action for d in answers] == [Action.ADMIT] * 20
    assert opened == 1  # behind the first tick's, on the same connection


def test_a_link_cut_with_calls_in_flight_sends_them_again_and_counts_each_once(
    relay: tuple[str, HoldingRelay], redis_client: redis.Redis, prefix: str
) -> None:
    url, held = relay

    async def run() -> list[Decision]:
        gate = AsyncGate(url, CONFIG, prefix=prefix)
        try:
            await gate.acquire("wide", "warm")
            sent = held.calls()
            held.passing.clear()
            first = [asyncio.ensure_future(gate.acquire("ten", f"a{i}", now_s=P))
                     for i in range(10)]
            await asyncio.sleep(0.2)
            second = [asyncio.ensure_future(gate.acquire("ten", f"b{i}", now_s=P))
                      for i in range(10)]
            assert await reached(held, sent + 20) == sent + 20
            held.cut()  # the server ran all 20; their answers are lost with the link
            held.passing.set()
            return list(await asyncio.gather(*first, *second))
        finally:
            held.passing.set()
            await gate.aclose()

    answers = asyncio.run(run())
    assert [d.action for d in answers] == [Action.ADMIT] * 10 + [Action.DELAY] * 10
    assert {round(d.slot_at - P) for d in answers[10:]} == {1}
    keys = keys_for(prefix, CONFIG.tool("ten"))
    # Sent twice, counted once: 10 admissions and 10 reserved slots in the log.
    assert redis_client.zcard(keys.log) == 20 and len(reservations(redis_client, keys)) == 10


def test_a_server_that_never_answers_fails_every_tick_in_flight_within_one_timeout(
    silent: SilentServer,  # noqa: F811
) -> None:
    url = f"redis://127.0.0.1:{silent.port}/0"

    async def run() -> tuple[list[Any], float]:
        gate = AsyncGate(url, CONFIG, prefix="throttle-test", socket_timeout_s=0.5)
        started = time.monotonic()
        try:
            calls = []
            for tick in range(3):
                calls += [asyncio.ensure_future(gate.acquire("wide", f"m{tick}-{i}"))
                          for i in range(10)]
                await asyncio.sleep(0.1)
            answers = await asyncio.gather(*calls, return_exceptions=True)
            return answers, time.monotonic() - started
        finally:
            await gate.aclose()

    answers, elapsed = asyncio.run(run())
    assert all(isinstance(a, StoreUnavailable) and url in str(a) for a in answers), answers
    assert elapsed < 3  # one socket timeout for all three ticks, not one each


def test_the_connection_goes_back_to_the_pool_once_no_call_is_in_flight(
    redis_url: str, prefix: str
) -> None:
    async def run() -> list[tuple[int, int]]:
        gate = AsyncGate(redis_url, CONFIG, prefix=prefix)
        pool = pool_of(gate)
        seen = []
        try:
            for burst in range(3):
                await asyncio.gather(*(gate.acquire("wide", f"m{burst}-{i}") for i in range(40)))
                await asyncio.sleep(0.05)
                seen.append((len(pool._available_connections), len(pool._in_use_connections)))
            return seen
        finally:
            await gate.aclose()

    assert asyncio.run(run()) == [(1, 0)] * 3
