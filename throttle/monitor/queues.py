"""How many calls wait in a tool's broker queue (not yet taken by a worker).

Redis broker: the LLEN of the queue's list and of kombu's priority sub-queues
(`tool.x`, `tool.x\\x06\\x163`, `...6`, `...9`). RabbitMQ: the message count of a passive
`queue.declare`. Calls a worker already holds (a delayed call waiting for its ETA, a call
in progress) are not counted: they are no longer in the queue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from throttle.store import mask_url

# kombu's Redis transport defaults (priority_steps, sep); a broker configured otherwise
# needs the same options here.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
TIMEOUT_S = 2.0


def redis_queue_names(queue: str) -> list[str]:
    """The lists kombu's Redis transport keeps for `queue`, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


class QueueDepths:
    """Reads queue depths from one broker; `depths()` is None per queue it cannot read."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.scheme = urlsplit(broker_url).scheme
        self._redis: redis.Redis | None = None
        if self.scheme in ("redis", "rediss", "unix"):
            self._redis = redis.Redis.from_url(
                broker_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                retry=Retry(NoBackoff(), 1),
            )

    def __repr__(self) -> str:
        return f"QueueDepths({mask_url(self.broker_url)!r})"

    def depths(self, queues: Sequence[str]) -> dict[str, int | None]:
        """Messages waiting in each of `queues` (None when the broker cannot say)."""
        if self._redis is not None:
            return self._redis_depths(self._redis, queues)
        if self.scheme in ("amqp", "pyamqp", "amqps"):
            return self._amqp_depths(queues)
        return dict.fromkeys(queues)

    @staticmethod
    def _redis_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int | None]:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for name in redis_queue_names(queue):
                pipe.llen(name)
        lengths = iter(pipe.execute())
        return {queue: sum(int(next(lengths)) for _ in PRIORITY_STEPS) for queue in queues}

    def _amqp_depths(self, queues: Sequence[str]) -> dict[str, int | None]:
        from kombu import Connection  # type: ignore[attr-defined]

        depths: dict[str, int | None] = {}
        with Connection(  # type: ignore[no-untyped-call]
            self.broker_url, connect_timeout=TIMEOUT_S
        ) as conn:
            for queue in queues:
                channel: Any = conn.channel()
                try:
                    depths[queue] = int(channel.queue_declare(queue, passive=True).message_count)
                except conn.channel_errors:  # the queue does not exist (yet)
                    depths[queue] = None
                finally:
                    with contextlib.suppress(*conn.connection_errors, *conn.channel_errors):
                        channel.close()
        return depths

    def close(self) -> None:
        """Close the broker connection this reader opened."""
        if self._redis is not None:
            self._redis.close()
