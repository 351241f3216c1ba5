"""Decisions as a Redis function library (FCALL), and as scripts where functions are refused.

The gate calls acquire.lua as a function library on Redis 7+. A server without FCALL (Redis
6, here a private server with the command renamed away) or a user whose ACL lacks `fcall`
gets EVALSHA instead, with one warning in the log, and the same decisions; a server that
loses the library mid-burst (FUNCTION FLUSH, a restart) has it loaded again, and no caller
sees an error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.servers import RedisServer, private_redis
from throttle import Action, AsyncGate, Gate, load_config, scripts
from throttle.keys import keys_for
from throttle.windows import most_in_window

pytestmark = [pytest.mark.faults, pytest.mark.redis]

P = 1_700_000_000.0
CONFIG = load_config({"tools": {"ten": {"limits": ["10/1s"], "max_delay": "1m"}}})
USER, PASSWORD = "gate-without-fcall", "not-a-secret-0"
FLUSHES = 20


def pinned_run(gate: Gate) -> list[Any]:
    """A fixed sequence of decisions on a pinned clock: admits, reservations, due calls,
    a late arrival and a deadline fallback."""
    answers = [gate.acquire("ten", f"m{i:02d}", now_s=P) for i in range(25)]
    answers += [gate.acquire("ten", f"m{i:02d}", now_s=P + 1.05) for i in range(10, 20)]
    answers.append(gate.acquire("ten", "late", now_s=P + 1.5, deadline_s=0.2))
    return [(d.action, round(d.wait_s, 3), round(d.slot_at - P, 3), d.reason) for d in answers]


@pytest.fixture
def no_fcall_server(tmp_path: Path) -> Any:
    """A private server on which FCALL is unknown, as on Redis 6."""
    with private_redis(tmp_path / "no-fcall", args=["--rename-command", "FCALL", ""]) as server:
        yield server


@pytest.fixture(autouse=True)
def warn_again() -> Any:
    """Each test sees the once-per-process warning afresh."""
    scripts._WARNED.clear()
    yield
    scripts._WARNED.clear()


def test_a_server_without_fcall_gets_the_same_decisions_as_scripts_and_one_warning(
    redis_url: str, prefix: str, no_fcall_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with_functions = Gate(redis_url, CONFIG, prefix=prefix)
    without = Gate(no_fcall_server.url(0), CONFIG, prefix=prefix)
    try:
        expected = pinned_run(with_functions)
        with caplog.at_level(logging.WARNING, logger="throttle"):
            got = pinned_run(without)
    finally:
        with_functions.close()
        without.close()
    assert got == expected
    assert Counter(action for action, *_ in got)[Action.DELAY] >= 10
    assert caplog.text.count("refused FCALL") == 1 and "EVALSHA" in caplog.text
    assert without._decide_lane.functions is False and with_functions._decide_lane.functions


def test_an_acl_user_without_fcall_decides_through_evalsha_sync_and_async(
    redis_server: RedisServer, redis_client: redis.Redis, prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_client.execute_command(
        "ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", f"~{prefix}:*", "+evalsha",
        "+script|load", "+time", "+zadd", "+zrem", "+zcard", "+zcount", "+zrevrange",
        "+zremrangebyscore", "+zrangebyscore", "+zscore", "+zrange", "+get", "+pttl",
        "+pexpire", "+hlen", "+hmget", "+hget", "+hdel", "+hset", "+ping")
    url = redis_server.url(0, user=USER, password=PASSWORD)
    gate = Gate(url, CONFIG, prefix=prefix)

    async def burst() -> list[Any]:
        agate = AsyncGate(url, CONFIG, prefix=prefix)
        try:
            return list(await asyncio.gather(
                *(agate.acquire("ten", f"a{i:02d}", now_s=P + 60) for i in range(20))))
        finally:
            await agate.aclose()

    try:
        with caplog.at_level(logging.WARNING, logger="throttle"):
            sync = [gate.acquire("ten", f"s{i:02d}", now_s=P).action.value for i in range(20)]
            concurrent = [d.action.value for d in asyncio.run(burst())]
    finally:
        gate.close()
    assert Counter(sync) == Counter(concurrent) == {"admit": 10, "delay": 10}
    assert "refused FCALL" in caplog.text and PASSWORD not in caplog.text


def test_function_flush_every_20ms_under_four_deciding_threads_reaches_no_caller(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    gate = Gate(redis_url, load_config(
        {"tools": {"ten": {"limits": ["10/200ms"], "max_delay": "1m"}}}), prefix=prefix)
    errors: list[BaseException] = []
    answers: Counter[str] = Counter()
    stop = threading.Event()
    flushes = 0

    def decide(worker: int) -> None:
        for i in range(5000):  # (bounded; stopped after enough flushes)
            if stop.is_set():
                return
            try:
                answers[gate.acquire("ten", f"w{worker}-{i}").action.value] += 1
            except BaseException as exc:  # (counted: none may reach a caller)
                errors.append(exc)

    def flush() -> None:
        nonlocal flushes
        while flushes < FLUSHES and not stop.wait(0.02):
            redis_client.function_flush()
            flushes += 1
        stop.set()

    flusher = threading.Thread(target=flush)
    flusher.start()
    threads = [threading.Thread(target=decide, args=(w,)) for w in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        stop.set()
        flusher.join()
        gate.close()
    log = redis_client.zrange(keys_for(prefix, gate.config.tools["ten"]).log, 0, -1,
                              withscores=True)
    missing = redis_client.info("errorstats").get("errorstat_ERR", {}).get("count", 0)
    print(f"\nFUNCTION FLUSH x{flushes}; answers {dict(answers)}; errors {len(errors)}; "
          f"'Function not found' answered {missing} times")
    assert flushes == FLUSHES and errors == [] and missing >= FLUSHES
    assert answers["admit"] >= 10 and answers["delay"] >= 100
    assert most_in_window([score / 1000 for _, score in log], 0.2) <= 10


def test_the_sync_gate_loads_its_function_library_once_after_the_server_lost_it(
    redis_client: redis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (On a server of its own: a gate of another test could load the library meanwhile.)
    gate = Gate(redis_url, CONFIG, prefix=prefix)
    loads: list[str] = []
    load = gate.client.function_load

    def counted_load(code: str, replace: bool = False) -> Any:
        loads.append(code)
        return load(code, replace)

    monkeypatch.setattr(gate.client, "function_load", counted_load)
    try:
        assert gate.acquire("ten", "warm").action is Action.ADMIT
        function = gate._acquire_script.function
        assert function is not None
        libraries = [entry[1] for entry in redis_client.function_list(function.decode())]
        assert libraries == [function]  # the library is named after its function
        redis_client.function_delete(function.decode())  # as FUNCTION FLUSH or a restart
        loads.clear()
        answers = [gate.acquire("ten", f"m{i}").action for i in range(5)]
        assert answers == [Action.ADMIT] * 5
        assert len(loads) == 1  # "Function not found" once, loaded, then FCALL again
    finally:
        gate.close()
