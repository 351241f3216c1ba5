""".delay() sends the call's registration first and confirms it once the call is published.

The two round trips overlap; the registry must still end exact: a registered call for every
published one, nothing left for a publish that failed, every connection back in its pool.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery

from throttle import Throttle, load_config

pytestmark = pytest.mark.redis

TOOLS = {"tools": {"search": {"limits": ["5/1s"], "max_delay": "30s"}}}


def make_tool(broker: str, redis_url: str, prefix: str) -> tuple[Throttle, Any]:
    app = Celery("overlap", broker=broker, backend="cache+memory://", set_as_current=False)
    throttle = Throttle(app, load_config(TOOLS), redis_url, prefix=prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    return throttle, search


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
    assert redis_client.zscore(calls, result.id) is not None
    assert in_use(throttle) == 0


def test_a_registration_after_a_script_flush_is_loaded_and_confirmed(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle, search = make_tool(redis_dbs[0], redis_url, prefix)
    search.delay(query="warm")
    redis_client.script_flush()
    result = search.delay(query="lamp")
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
