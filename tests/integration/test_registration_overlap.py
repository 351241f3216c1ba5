""".delay() queues the call's registration for the registrar (throttle/registrar.py), which
sends it in the background; with its queue full, the registration is sent before the publish
and confirmed after it, so the two round trips overlap.

The registry must still end exact: a registered call for every published one, nothing left
for a publish that failed, every connection back in its pool.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from celery import Celery

from tests.support.relay import Relay
from throttle import Throttle, load_config
from throttle.scripts import load_script
from throttle.store import client_options

pytestmark = pytest.mark.redis

TOOLS = {"tools": {"search": {"limits": ["5/1s"], "max_delay": "30s"}}}


def make_tool(broker: str, redis_url: str, prefix: str) -> tuple[Throttle, Any]:
    app = Celery("overlap", broker=broker, backend="cache+memory://", set_as_current=False)
    throttle = Throttle(app, load_config(TOOLS), redis_url, prefix=prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    return throttle, search


class LosingScriptAnswers(Relay):
    """Closes the connection instead of passing on the answer to any EVALSHA (which has run);
    every other reply (a connection's handshake) goes through."""

    def __init__(self, host: str, port: int) -> None:
        self.lost = 0
        self._script_sent = False
        super().__init__(host, port)

    def _forward(self, data: bytes, replies: bool) -> bool:
        if not replies:
            self._script_sent = b"EVALSHA" in data
            return True
        if self._script_sent:
            self.lost += 1
            return False
        return True


def in_use(throttle: Throttle) -> int:
    pool: Any = getattr(throttle.gate.client, "connection_pool")  # noqa: B009  # one server
    return len(pool._in_use_connections)


@pytest.mark.parametrize("error", [ConnectionError, KeyboardInterrupt])
def test_a_publish_that_fails_leaves_no_registration_and_no_connection_held(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException],
) -> None:
    throttle, search = make_tool(redis_dbs[0], redis_url, prefix)
    calls, messages = throttle.gate.registry("search")

    def broker_down(*_: Any, **__: Any) -> Any:
        raise error("broker down")

    monkeypatch.setattr(throttle.app, "send_task", broker_down)
    with pytest.raises(error, match="broker down"):
        search.delay(query="lamp")
    assert redis_client.zcard(calls) == 0 and redis_client.hlen(messages) == 0
    assert in_use(throttle) == 0
    monkeypatch.undo()
    result = search.delay(query="lamp")  # the same gate goes on as before
    throttle.flush_registrations()  # sent in the background
    assert redis_client.zscore(calls, result.id) is not None
    assert in_use(throttle) == 0


def test_a_registration_after_a_script_flush_is_loaded_and_confirmed(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle, search = make_tool(redis_dbs[0], redis_url, prefix)
    search.delay(query="warm")
    redis_client.script_flush()
    result = search.delay(query="lamp")
    throttle.flush_registrations()
    calls, messages = throttle.gate.registry("search")
    assert redis_client.zscore(calls, result.id) is not None
    assert redis_client.hexists(messages, result.id)
    assert in_use(throttle) == 0


def test_registrations_in_flight_together_are_each_confirmed(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle, _ = make_tool(redis_dbs[0], redis_url, prefix)
    pending = [
        throttle.gate.start_register_call("search", f"call-{i}", f"message {i}", 2e9)
        for i in range(20)
    ]
    assert in_use(throttle) == 20  # each waits for its answer on its own connection
    for registration in reversed(pending):
        registration.wait()
    calls, messages = throttle.gate.registry("search")
    assert redis_client.zcard(calls) == 20
    assert redis_client.hget(messages, "call-7") == b"message 7"
    assert in_use(throttle) == 0


def test_a_registration_whose_answer_is_lost_leaves_the_call_published_and_registered(
    redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    kwargs: Any = redis_client.connection_pool.connection_kwargs
    app = Celery("overlap", broker=redis_dbs[0], backend="cache+memory://",
                 set_as_current=False)
    redis_client.script_load(load_script("register"))  # the lost answer is not a NOSCRIPT
    with LosingScriptAnswers(kwargs["host"], kwargs["port"]) as relay:
        lossy = redis.Redis(host="127.0.0.1", port=relay.port, db=kwargs.get("db", 0),
                            **client_options(2.0))
        throttle = Throttle(app, load_config(TOOLS), redis_client=lossy, prefix=prefix)

        @throttle.tool
        def search(query: str = "") -> str:
            return query

        with caplog.at_level(logging.WARNING, logger="throttle"):
            result = search.delay(query="lamp")
            throttle.flush_registrations()  # sent in the background
        assert relay.lost >= 2  # the answer, then the one of the try again, were lost
        assert in_use(throttle) == 0
    assert f"call {result.id} is enqueued but not registered for recovery" in caplog.text
    calls, messages = throttle.gate.registry("search")
    assert redis_client.zscore(calls, result.id) is not None  # it reached the server
    assert redis_client.hexists(messages, result.id)
    broker = redis.Redis.from_url(redis_dbs[0])
    queued = list(broker.scan_iter(match="tool.search*"))
    assert sum(broker.llen(key) for key in queued) == 1  # published all the same
