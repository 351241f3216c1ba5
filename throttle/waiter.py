"""Wait for many Celery results at once, on one event loop and one Redis connection.

Celery's Redis result backend stores a result with SET and publishes the same value on a
channel named like the key (`celery-task-meta-<id>`). `ResultWaiter.watch(key)` subscribes
to that channel before the call is published, so no result can slip by; one reader task
hands each message to the waiting request. A sweep every `sweep_s` reads every watched key
with MGET, which catches a result published while the connection was being re-established.
No thread waits, however many requests do. The gateway and `throttle.wait` share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
import redis.asyncio

logger = logging.getLogger("throttle")

Decode = Callable[[bytes], dict[str, Any] | None]
MGET_CHUNK = 500
READ_TIMEOUT_S = 1.0
RETRY_PAUSE_S = 0.5


class ResultWaiter:
    """Futures for watched result keys, filled from pub/sub messages (and a sweep).

    `decode` turns a stored value into Celery's result meta, or None while the state is
    not final (e.g. STARTED): the waiter then keeps waiting.
    """

    def __init__(self, client: redis.asyncio.Redis, decode: Decode, *, sweep_s: float = 1.0):
        self._client = client
        self._decode = decode
        self._sweep_s = sweep_s
        # Several waits may watch one key (the same call awaited twice).
        self._pending: dict[bytes, list[asyncio.Future[dict[str, Any]]]] = {}
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def watched(self) -> int:
        """How many results are awaited now."""
        return len(self._pending)

    async def start(self) -> None:
        """Open the subscription (raises redis.RedisError when Redis cannot be reached)."""
        self._pubsub = self._client.pubsub()
        # A channel of our own keeps the connection subscribed while nothing else is.
        await self._pubsub.subscribe(f"throttle-waiter-{uuid.uuid4().hex}")
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._sweep())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pubsub is not None:
            await self._pubsub.aclose()
        for futures in self._pending.values():
            for future in futures:
                future.cancel()

    @contextlib.asynccontextmanager
    async def watch(self, key: bytes) -> AsyncIterator[asyncio.Future[dict[str, Any]]]:
        """Subscribe to `key`'s channel; the future gets its result meta. Publish the call
        inside the block, then await the future (with a timeout)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        futures = self._pending.setdefault(key, [])
        futures.append(future)
        try:
            if len(futures) == 1:
                await self._pubsub.subscribe(key)
            yield future
        finally:
            futures.remove(future)
            if not futures:
                del self._pending[key]
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._pubsub.unsubscribe(key)

    def _deliver(self, key: bytes, payload: bytes | str | None) -> None:
        futures = [f for f in self._pending.get(key, ()) if not f.done()]
        if not futures or payload is None:
            return
        try:
            meta = self._decode(payload.encode() if isinstance(payload, str) else payload)
        except Exception as exc:  # a value we cannot read must not stop the reader
            logger.warning("result %s cannot be decoded (%s)", key.decode(errors="replace"), exc)
            return
        if meta is not None:
            for future in futures:
                future.set_result(meta)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=READ_TIMEOUT_S
                )
            except (redis.RedisError, OSError) as exc:
                logger.warning("result subscription interrupted (%s); reconnecting", exc)
                await asyncio.sleep(RETRY_PAUSE_S)
                await self._sweep_once()
                continue
            if message is not None and message.get("type") == "message":
                self._deliver(bytes(message["channel"]), message["data"])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            await self._sweep_once()

    async def _sweep_once(self) -> None:
        keys = list(self._pending)
        for start in range(0, len(keys), MGET_CHUNK):
            chunk = keys[start : start + MGET_CHUNK]
            try:
                values = await self._client.mget(chunk)
            except (redis.RedisError, OSError) as exc:
                logger.warning("result sweep failed (%s); retrying in %gs", exc, self._sweep_s)
                return
            for key, value in zip(chunk, values, strict=True):
                self._deliver(key, value)
