"""`ResultWaiter` on the real Redis: results are published as Celery's Redis backend does
(SET, then PUBLISH on a channel named like the key), into the result database the tests own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import redis.asyncio

from throttle.waiter import ResultWaiter

pytestmark = [pytest.mark.redis]


def decode(payload: bytes) -> dict[str, Any] | None:
    meta = json.loads(payload)
    return meta if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED") else None


def store(client: redis.Redis, key: str, status: str) -> None:
    """What a worker does with a result: SET the key, PUBLISH it on the key's channel."""
    value = json.dumps({"status": status, "result": {"ok": True}, "task_id": key})
    pipe = client.pipeline()
    pipe.set(key, value, ex=60)
    pipe.publish(key, value)
    pipe.execute()


@asynccontextmanager
async def waiter(url: str, *, sweep_s: float, name: str = "") -> AsyncIterator[ResultWaiter]:
    client = redis.asyncio.Redis.from_url(url, client_name=name or None)
    started = ResultWaiter(client, decode, sweep_s=sweep_s)
    await started.start()
    try:
        yield started
    finally:
        await started.close()
        await client.aclose()


def run(coroutine: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine(), 30))


def test_many_results_awaited_at_once_each_arrive_by_pub_sub_in_milliseconds(
    redis_dbs: tuple[str, str],
) -> None:
    backend = redis.Redis.from_url(redis_dbs[1])
    keys = [f"celery-task-meta-{uuid.uuid4()}" for _ in range(500)]

    async def scenario() -> list[float]:
        async with waiter(redis_dbs[1], sweep_s=30) as results:  # no sweep within the test
            async def one(key: str) -> float:
                async with results.watch(key.encode()) as future:
                    began = time.perf_counter()
                    await asyncio.to_thread(store, backend, key, "SUCCESS")
                    await future
                    return time.perf_counter() - began
            lags = await asyncio.gather(*(one(key) for key in keys))
            assert results.watched == 0
            return list(lags)

    lags = sorted(run(scenario))
    print(f"\nwaiter: 500 concurrent waits, from the publish to the answer p50 "
          f"{lags[250] * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms")
    assert lags[-1] < 5  # far under the 30 s sweep: every one came by pub/sub


def test_a_state_that_is_not_final_keeps_the_caller_waiting(redis_dbs: tuple[str, str]) -> None:
    backend = redis.Redis.from_url(redis_dbs[1])
    key = f"celery-task-meta-{uuid.uuid4()}"

    async def scenario() -> dict[str, Any]:
        async with waiter(redis_dbs[1], sweep_s=0.2) as results, \
                results.watch(key.encode()) as future:
            store(backend, key, "STARTED")
            await asyncio.sleep(0.5)  # two sweeps see STARTED too
            assert not future.done()
            store(backend, key, "SUCCESS")
            return await future

    assert run(scenario)["status"] == "SUCCESS"


def test_a_result_published_while_the_subscription_is_cut_still_arrives(
    redis_dbs: tuple[str, str],
) -> None:
    backend = redis.Redis.from_url(redis_dbs[1])
    name = f"gateway-test-{uuid.uuid4().hex[:8]}"
    keys = [f"celery-task-meta-{uuid.uuid4()}" for _ in range(3)]

    async def scenario() -> float:
        async with waiter(redis_dbs[1], sweep_s=0.5, name=name) as results:
            async with results.watch(keys[0].encode()) as first, \
                    results.watch(keys[1].encode()) as second:
                # Cut only this test's own subscription (found by its client name).
                ours = [c for c in backend.client_list() if c.get("name") == name
                        and int(c.get("sub", 0)) > 0]
                assert len(ours) == 1
                backend.client_kill_filter(_id=ours[0]["id"])
                store(backend, keys[0], "SUCCESS")  # may be published to no one
                began = time.perf_counter()
                await first
                store(backend, keys[1], "SUCCESS")
                await second
                lag = time.perf_counter() - began
            async with results.watch(keys[2].encode()) as third:  # and it still works
                store(backend, keys[2], "SUCCESS")
                await asyncio.wait_for(third, 2)
            return lag

    lag = run(scenario)
    print(f"\nwaiter: subscription cut; both results in {lag * 1000:.0f} ms")
    assert lag < 3
