"""Hand-built task messages that bypass a task's `.delay()`, for tests of what workers refuse.

`publish_raw` sends a Celery protocol-2 message for a task, serialized as asked (e.g.
pickle), to a queue the app declares. `Tripwire` is a value whose unpickling creates a file:
a test knows a body was deserialized if, and only if, that file exists.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from celery import Celery


class Tripwire:
    """Unpickling this creates (empties) the file at `path`; nothing else does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def publish_raw(
    app: Celery,
    queue: str,
    task: str,
    kwargs: dict[str, Any],
    *,
    serializer: str,
    task_id: str | None = None,
) -> str:
    """Publish a call of `task` with `kwargs` to `queue`, encoded with `serializer`.

    Headers and body are those Celery itself builds (protocol 2); only the serializer
    differs from what the app would use. Returns the task id.
    """
    task_id = task_id or str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=(), kwargs=kwargs)
    declared = app.amqp.queues[queue]
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange=declared.exchange,
            routing_key=declared.routing_key,
            serializer=serializer,
            headers=message.headers,
            declare=[declared],
            retry=True,
            **message.properties,
        )
    return task_id


def publish_message(
    app: Celery,
    queue: str,
    body: Any,
    headers: dict[str, Any],
    *,
    serializer: str = "json",
) -> None:
    """Publish `body` with exactly `headers` to `queue`: no check, no header of Celery's
    own beyond what the caller writes (a body already `bytes` is sent as it is)."""
    declared = app.amqp.queues[queue]
    options: dict[str, Any] = {"serializer": serializer}
    if isinstance(body, bytes):
        options = {"content_type": "application/json", "content_encoding": "utf-8"}
    with app.producer_or_acquire() as producer:
        producer.publish(
            body, exchange=declared.exchange, routing_key=declared.routing_key,
            headers=headers, declare=[declared], retry=True, **options,
        )
