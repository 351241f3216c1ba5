"""`await throttle.wait(result)` against real workers: answers, fallbacks, failures,
timeouts, many concurrent awaits on one event loop with no thread per call."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError

import throttle
from tests.apps.ledger import build
from tests.support.servers import free_port

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

PARAMS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}


def tool(limits: list[str], max_delay: str) -> dict[str, Any]:
    return {"limits": limits, "max_delay": max_delay, "params": PARAMS,
            "result": {"type": "object"}, "fallback": {"n": -1}}


def pubsub_connections(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return len(client.client_list(_type="pubsub"))
    finally:
        client.close()


def test_many_concurrent_awaits_share_one_subscription_and_no_thread(
    make_cluster: Any, redis_dbs: tuple[str, str]
) -> None:
    cluster = make_cluster({"tools": {"wide": tool(["100/1s"], "30s")}})
    cluster.start(1, concurrency=2)
    _, _, tasks = build(cluster.env)
    calls = 300

    async def main() -> tuple[list[Any], int, int, int]:
        results = [tasks["wide"].delay(n=n) for n in range(calls)]
        # (Celery's Redis backend subscribes in .delay() itself, for .get(): counted before.)
        threads_before = threading.active_count()
        subscribers_before = pubsub_connections(redis_dbs[1])
        most_threads, most_subscribers = 0, 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal most_threads, most_subscribers
            while not done.is_set():
                most_threads = max(most_threads, threading.active_count())
                most_subscribers = max(most_subscribers, pubsub_connections(redis_dbs[1]))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        answers = await asyncio.gather(*(throttle.wait(r, timeout=60) for r in results))
        done.set()
        await sampler
        assert [throttle.outcome(r) for r in results] == ["result"] * calls
        return (answers, most_threads - threads_before,
                most_subscribers - subscribers_before, len(asyncio.all_tasks()))

    started = time.monotonic()
    answers, extra_threads, extra_subscribers, tasks_left = asyncio.run(main())
    print(f"\nwait: {calls} concurrent awaits in {time.monotonic() - started:.2f}s, "
          f"{extra_threads} extra threads, {extra_subscribers} extra pub/sub connections")
    assert answers == [{"n": n} for n in range(calls)]
    assert extra_threads == 0
    assert extra_subscribers == 1
    assert tasks_left == 1  # only main(): the waiter closed with its last wait


def test_wait_returns_fallbacks_raises_failures_and_revokes_and_serves_repeats(
    make_cluster: Any, redis_dbs: tuple[str, str]
) -> None:
    cluster = make_cluster({"tools": {"narrow": tool(["1/10s"], "30s")}})
    cluster.start(1, concurrency=2)
    app, _, tasks = build(cluster.env)

    async def main() -> None:
        first = tasks["narrow"].delay(n=1)
        twice = await asyncio.gather(throttle.wait(first, timeout=30),
                                     throttle.wait(first, timeout=30))  # one call, awaited twice
        assert twice == [{"n": 1}, {"n": 1}]
        second = tasks["narrow"].apply_async(kwargs={"n": 2}, deadline_s=2)  # next slot: 10 s
        assert await throttle.wait(second, timeout=30) == {"n": -1}
        assert throttle.outcome(first) == "result"
        assert throttle.outcome(second) == "fallback"
        assert throttle.fallback_reason(second) == "deadline"
        # Already finished: answered from the stored result.
        again = app.AsyncResult(first.id)
        assert await throttle.wait(again, timeout=5) == {"n": 1}

        bad = app.send_task("tool.narrow", kwargs={"n": "one"}, queue="tool.narrow")
        with pytest.raises(Exception, match="is not of type 'integer'") as info:
            await throttle.wait(bad, timeout=30)
        assert type(info.value).__name__ == "InvalidToolCall"

        revoked = tasks["narrow"].delay(n=3)  # reserved ~10 s ahead
        await asyncio.sleep(0.5)
        app.control.revoke(revoked.id)
        with pytest.raises(TaskRevokedError):
            await throttle.wait(revoked, timeout=30)

    asyncio.run(main())


def test_a_timeout_says_what_to_check_and_a_wrong_backend_is_refused(
    make_cluster: Any, redis_dbs: tuple[str, str]
) -> None:
    cluster = make_cluster({"tools": {"idle": tool(["1/1s"], "5s")}})  # no worker started
    _, _, tasks = build(cluster.env)

    async def main() -> int:
        result = tasks["idle"].delay(n=1)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no answer after 0\.3s.*serves its tool's queue"):
            await throttle.wait(result, timeout=0.3)
        assert time.monotonic() - started < 2.0
        # A wait cancelled (say, the HTTP client went away) leaves nothing behind.
        waiting = asyncio.create_task(throttle.wait(result))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(asyncio.all_tasks()) == 1
        # A result backend that does not answer: said plainly, without its password.
        dead = Celery("dead", backend=f"redis://:s3cret@127.0.0.1:{free_port()}/0",
                      set_as_current=False)
        with pytest.raises(ConnectionError, match="cannot be reached") as info:
            await throttle.wait(dead.AsyncResult("x"), timeout=5)
        assert "s3cret" not in str(info.value) and "***" in str(info.value)
        with pytest.raises(TypeError, match="Redis result backend"):
            await throttle.wait(Celery("no-backend", set_as_current=False).AsyncResult("x"))
        with pytest.raises(TypeError, match="AsyncResult of one call"):
            await throttle.wait("not a result")  # type: ignore[arg-type]
        return len(asyncio.all_tasks())

    assert asyncio.run(main()) == 1
