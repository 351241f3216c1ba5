"""What the demo runs on: a Celery app with the tools' tasks, and the gate's Redis."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from throttle.demo.seed import DEMO_TOOLS, LLM_TOOL, body
from throttle.routing import Throttle

# Finished results are kept in the backend's cache, so `outcome()` reads no key twice.
RESULT_CACHE_MAX = 1_000_000


@dataclass(frozen=True)
class Stack:
    """A running broker, worker(s), result backend and gate store, as the caller sees them."""

    mode: str
    app: Celery
    tasks: dict[str, Any]
    store: redis.Redis
    prefix: str
    details: str
    kept: bool = False  # the gate's keys stay after the run (`throttle demo --keep`)

    def forget_results(self, task_ids: Iterable[str]) -> None:
        """Delete the stored results of `task_ids` from the result backend."""
        backend = self.app.backend
        client = getattr(backend, "client", None)
        if not isinstance(client, redis.Redis):
            for task_id in task_ids:
                backend.forget(task_id)
            return
        keys = [backend.get_key_for_task(task_id) for task_id in task_ids]
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


def register_tools(throttle: Throttle) -> dict[str, Any]:
    """The seed's tool bodies (see `throttle.demo.seed`) as tasks of `throttle`'s app.

    Only the tools the config declares; the task names match the deployed workers'. The
    tasks are created at once (`lazy=False`) and, like every throttle tool, not shared with
    other apps.
    """
    return {
        name: throttle.tool(name, lazy=False)(body(name))
        for name in (*DEMO_TOOLS, LLM_TOOL)
        if name in throttle.config.tools
    }
