"""`await throttle.wait(result)`: a call's answer in asyncio code, with no thread per call.

`result.get()` blocks a thread for as long as the call waits for its slot. `wait` awaits the
same answer on the event loop instead: every call awaited on one loop shares one
`ResultWaiter` (one Redis pub/sub connection to the result backend), opened by the first
wait and closed when the last one ends. It needs Celery's Redis result backend, whose
results are published on a channel named like their key.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from celery import states
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult, EagerResult

from throttle.store import mask_url
from throttle.waiter import ResultWaiter

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")
SOCKET_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8  # per loop and result backend: the subscription and the reads


@dataclass
class _Shared:
    """One loop's waiter for one result backend, and how many waits use it."""

    client: redis.asyncio.Redis
    waiter: ResultWaiter
    started: asyncio.Task[None]
    users: int = 0


# Per event loop, per result backend URL.
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Shared]] = (
    weakref.WeakKeyDictionary()
)


async def wait(result: AsyncResult, *, timeout: float | None = None) -> Any:
    """The call's answer, or its fallback: what `result.get()` returns, awaited.

    A call that failed raises its exception, a revoked one `TaskRevokedError`. After it,
    `outcome(result)` and `fallback_reason(result)` read the answer without a round trip.
    `timeout` (seconds, None for no limit) raises `TimeoutError`; the call may still end.
    """
    if isinstance(result, EagerResult):  # eager mode: the answer is already here
        return result.get()
    if not isinstance(result, AsyncResult):
        raise TypeError(
            f"throttle.wait takes the AsyncResult of one call (what .delay() returns), "
            f"not {type(result).__name__}"
        )
    if result._cache is None:  # Celery caches a finished result here
        backend = _redis_backend(result)
        key = backend.get_key_for_task(result.id)
        try:
            async with _waiter_for(backend) as (client, waiter), waiter.watch(key) as answer:
                stored = await client.get(key)  # it may have ended before we subscribed
                meta = _final_meta(backend, stored) if stored is not None else None
                if meta is None:
                    meta = await _await_answer(result, answer, timeout)
        except TimeoutError:
            raise  # an OSError too, but ours: the call has not ended in time
        except (redis.RedisError, OSError) as exc:
            raise ConnectionError(
                f"the result backend at {mask_url(str(backend.url))} cannot be reached "
                f"({type(exc).__name__}: {exc}); check that it runs, then await again"
            ) from None
        result._maybe_set_cache(meta)
    return result.maybe_throw()


async def _await_answer(result: AsyncResult, answer: asyncio.Future[dict[str, Any]],
                        timeout: float | None) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(answer, timeout)
    except TimeoutError:
        raise TimeoutError(
            f"call {result.id} has no answer after {timeout:g}s; it "
            "may still end: await throttle.wait(result) again, or check that a worker "
            "serves its tool's queue"
        ) from None


def _redis_backend(result: AsyncResult) -> RedisBackend:
    backend = result.backend
    url = str(getattr(backend, "url", "") or "")
    if not isinstance(backend, RedisBackend) or not url.startswith(REDIS_URL_SCHEMES):
        raise TypeError(
            f"throttle.wait needs Celery's Redis result backend (result_backend = "
            f"'redis://...'); this app's is {type(backend).__name__}. Set a Redis result "
            "backend, or call result.get() in a thread"
        )
    return backend


def _final_meta(backend: RedisBackend, payload: bytes | str) -> dict[str, Any] | None:
    """A stored result's meta once the call has ended; None while it has not."""
    meta = backend.decode_result(payload)
    if not isinstance(meta, dict) or meta.get("status") not in states.READY_STATES:
        return None
    return meta


@contextlib.asynccontextmanager
async def _waiter_for(
    backend: RedisBackend,
) -> AsyncIterator[tuple[redis.asyncio.Redis, ResultWaiter]]:
    """This loop's shared waiter for `backend`, opened by its first user, closed by its last."""
    loop = asyncio.get_running_loop()
    per_loop = _SHARED.setdefault(loop, {})
    url = str(backend.url)
    shared = per_loop.get(url)
    if shared is None:
        # A few connections, waited for when busy: thousands of waits must not open thousands.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, socket_connect_timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        waiter = ResultWaiter(client, lambda payload: _final_meta(backend, payload))
        shared = per_loop[url] = _Shared(client, waiter, asyncio.ensure_future(waiter.start()))
    shared.users += 1
    try:
        await asyncio.shield(shared.started)
        yield shared.client, shared.waiter
    finally:
        shared.users -= 1
        if shared.users == 0 and per_loop.get(url) is shared:
            del per_loop[url]
            await asyncio.shield(_close(shared))


async def _close(shared: _Shared) -> None:
    if not shared.started.done():
        shared.started.cancel()
    with contextlib.suppress(asyncio.CancelledError, redis.RedisError, OSError):
        await shared.started  # a start that failed was reported to its waits already
    if not shared.started.cancelled() and shared.started.exception() is None:
        await shared.waiter.close()
    with contextlib.suppress(redis.RedisError, OSError):
        await shared.client.aclose()
