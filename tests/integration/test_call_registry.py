"""Calls are registered for recovery (throttle/recovery.py) only where a broker can lose them:
kombu's Redis transport. RabbitMQ requeues what a dead consumer held, and the in-memory
broker loses nothing, so their calls cost no registration round trip."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis
from celery import Celery, chord
from celery.exceptions import MaxRetriesExceededError, Retry

from throttle import InvalidToolCall, Throttle, fallback_reason, load_config, recovery

pytestmark = pytest.mark.redis

TOOLS = {"tools": {"search": {"limits": ["5/1s"], "max_delay": "30s"}}}


def throttle_on(broker: str, redis_url: str, prefix: str) -> Throttle:
    app = Celery("registry", broker=broker, backend="cache+memory://", set_as_current=False)
    return Throttle(app, load_config(TOOLS), redis_url, prefix=prefix)


@pytest.mark.parametrize(("broker", "registers"), [
    ("redis://127.0.0.1:6379/15", True),
    ("rediss://127.0.0.1:6380/15", True),
    ("sentinel://127.0.0.1:26379", True),
    ("amqp://guest:guest@127.0.0.1:5672//", False),
    ("pyamqp://guest:guest@127.0.0.1:5672//", False),
    ("memory://", False),
])
def test_only_redis_brokers_register_calls(
    broker: str, registers: bool, redis_url: str, prefix: str
) -> None:
    assert throttle_on(broker, redis_url, prefix).register_calls is registers


def test_a_call_on_the_in_memory_broker_leaves_no_registry_entry(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    throttle = throttle_on("memory://", redis_url, prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    search.delay(query="lamp")
    assert list(redis_client.scan_iter(match=f"{prefix}:*")) == []


def test_a_call_on_a_redis_broker_is_registered_until_the_gate_decides_it(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle = throttle_on(redis_dbs[0], redis_url, prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    result = search.delay(query="lamp")
    throttle.flush_registrations()  # sent in the background
    calls, messages = throttle.gate.registry("search")
    assert redis_client.zscore(calls, result.id) is not None
    assert redis_client.hexists(messages, result.id)
    throttle.gate.acquire("search", result.id)  # the gate decides: out of the registry
    assert redis_client.zscore(calls, result.id) is None
    assert not redis_client.hexists(messages, result.id)


def test_a_body_retry_is_registered_under_its_retry_member_until_the_gate_decides_it(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    """`self.retry()` in a worker registers `<id>~retry<n>` (the member the gate decides);
    a retry refused by max_retries leaves nothing registered."""
    throttle = throttle_on(redis_dbs[0], redis_url, prefix)

    @throttle.tool("search", bind=True, max_retries=1)
    def search(self: Any, query: str = "") -> str:
        return query

    calls, _ = throttle.gate.registry("search")
    search.push_request(id="call-1", retries=0, kwargs={"query": "lamp"}, called_directly=False)
    try:
        with pytest.raises(Retry):
            search.retry(countdown=60)
    finally:
        search.pop_request()
    assert redis_client.zscore(calls, "call-1~retry1") is not None
    throttle.gate.acquire("search", "call-1~retry1")
    assert redis_client.zscore(calls, "call-1~retry1") is None

    search.push_request(id="call-2", retries=1, kwargs={"query": "desk"}, called_directly=False)
    try:
        with pytest.raises(MaxRetriesExceededError):
            search.retry(countdown=60)
    finally:
        search.pop_request()
    assert redis_client.zrange(calls, 0, -1) == []


def test_the_reaper_sends_a_lost_retry_again_with_its_task_id_and_retry_number(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle = throttle_on(redis_dbs[0], redis_url, prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    lost_at = time.time() - 100
    headers = {"throttle_enqueued_at": lost_at}
    throttle.gate.register_call("search", "call-9~retry2",
                                recovery.message({"query": "lamp"}, headers, lost_at), lost_at)
    assert recovery.reap(throttle, ["search"]) == 1
    broker = redis.Redis.from_url(redis_dbs[0])
    sent = [json.loads(raw) for key in broker.scan_iter(match="tool.search*")
            for raw in broker.lrange(key, 0, -1)]
    assert [(m["headers"]["id"], m["headers"]["retries"]) for m in sent] == [("call-9", 2)]
    calls, _ = throttle.gate.registry("search")
    assert redis_client.zrange(calls, 0, -1) == [b"call-9~retry2"]  # until the gate decides


def test_the_reaper_publishes_a_lost_call_once_then_answers_it_with_the_fallback(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    """A call whose message is lost again after the reaper re-published it (say, one that
    stops every worker that takes it) is not published a second time: it is answered with
    the fallback, marked 'lost', and leaves the registry."""
    throttle = throttle_on(redis_dbs[0], redis_url, prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    broker = redis.Redis.from_url(redis_dbs[0])
    result = search.delay(query="lamp")
    throttle.flush_registrations()
    broker.delete(*broker.keys("tool.search*"))  # the broker lost it
    calls, _ = throttle.gate.registry("search")
    lost_at = float(redis_client.zscore(calls, result.id) or 0) / 1000
    assert recovery.reap(throttle, ["search"], now_s=lost_at + 1) == 1
    assert broker.llen("tool.search") == 1  # published again
    broker.delete(*broker.keys("tool.search*"))  # and lost again
    later_s = lost_at + 1 + recovery.RETRY_S + 1
    assert recovery.reap(throttle, ["search"], now_s=later_s) == 0
    assert recovery.reap(throttle, ["search"], now_s=later_s + 60) == 0
    assert not broker.keys("tool.search*")  # never a second time
    # (another test may have run a worker in this process: it is no task here)
    assert result.get(timeout=1, disable_sync_subtasks=False) is None
    assert fallback_reason(result) == "lost"
    assert redis_client.zcard(calls) == 0


def test_the_reaper_never_publishes_a_call_that_already_failed(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle = throttle_on(redis_dbs[0], redis_url, prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    broker = redis.Redis.from_url(redis_dbs[0])
    result = search.delay(query="lamp")
    throttle.flush_registrations()
    broker.delete(*broker.keys("tool.search*"))
    search.backend.mark_as_failure(result.id, InvalidToolCall("search", "refused"))
    calls, _ = throttle.gate.registry("search")
    lost_at = float(redis_client.zscore(calls, result.id) or 0) / 1000
    assert recovery.reap(throttle, ["search"], now_s=lost_at + 1) == 0
    assert not broker.keys("tool.search*") and redis_client.zcard(calls) == 0
    assert result.state == "FAILURE"


def sent(broker: redis.Redis, queue: str) -> dict[str, tuple[dict[str, Any], Any]]:
    """The task messages waiting in `queue` (kombu's Redis lists, one per priority):
    id -> (headers, body)."""
    messages = [json.loads(raw) for key in broker.keys(f"{queue}*")
                for raw in broker.lrange(key, 0, -1)]
    return {m["headers"]["id"]: (m["headers"], json.loads(base64.b64decode(m["body"])))
            for m in messages}


def test_a_lost_call_keeps_its_chain_chord_and_links_when_published_again_or_given_up(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    """The reaper publishes a lost call with its place in a canvas, and a call it gives up
    continues its chain, its chord and its links with the fallback: a canvas never stalls on
    a message the broker lost."""
    app = Celery("registry", broker=redis_dbs[0], backend=redis_dbs[1], set_as_current=False)
    throttle = Throttle(app, load_config(TOOLS), redis_url, prefix=prefix)

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    def step(*_: Any) -> None:
        return None

    for name in ("chain_next", "chord_body", "linked"):
        app.task(name=name)(step)
    tasks = app.tasks
    in_chain = (search.si(query="lamp") | tasks["chain_next"].si()).apply_async().parent
    chord([search.si(query="desk")], tasks["chord_body"].si()).apply_async()
    linked = search.apply_async(kwargs={"query": "rug"}, link=tasks["linked"].si())
    broker = redis.Redis.from_url(redis_dbs[0])
    first = sent(broker, "tool.search")
    assert len(first) == 3 and in_chain.id in first and linked.id in first
    broker.delete(*broker.keys("tool.search*"))  # the broker lost all three
    throttle.flush_registrations()
    calls, _ = throttle.gate.registry("search")
    lost_at = max(score for _, score in redis_client.zrange(calls, 0, -1, withscores=True)) / 1000

    assert recovery.reap(throttle, ["search"], now_s=lost_at + 1) == 3
    again = sent(broker, "tool.search")
    assert again.keys() == first.keys()
    ids = ("root_id", "parent_id", "group", "group_index")
    for task_id, (headers, body) in first.items():  # each with its place in the canvas
        assert again[task_id][1][2] == body[2]  # (chain, chord, callbacks, errbacks)
        assert {k: again[task_id][0][k] for k in ids} == {k: headers[k] for k in ids}

    broker.delete(*broker.keys("tool.search*"))  # lost again: given up, with the fallback
    assert recovery.reap(throttle, ["search"], now_s=lost_at + recovery.RETRY_S + 2) == 0
    assert fallback_reason(in_chain) == "lost" and fallback_reason(linked) == "lost"
    continued = sorted((headers["task"], headers["root_id"] == headers["id"])
                       for headers, _ in sent(broker, "celery").values())
    assert [name for name, _ in continued] == ["chain_next", "chord_body", "linked"]
    assert redis_client.zcard(calls) == 0
