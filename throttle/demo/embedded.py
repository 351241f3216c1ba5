"""The embedded default: broker, worker and gate store in this one process.

Celery's `memory://` broker (polled every 10 ms: its default polling made a burst take three
times as long), a `cache+memory://` result backend, an in-process worker (8 threads) and
fakeredis, which runs the gate's own Lua scripts through lupa. Nothing to install or start;
the real thing is the same code on Redis with worker processes (see `real.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import fakeredis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from throttle.config import Config
from throttle.demo.stack import RESULT_CACHE_MAX, Stack, register_tools
from throttle.routing import Throttle

PREFIX = "throttle-demo"
WORKER_THREADS = 8
POLLING_INTERVAL_S = 0.01
SHUTDOWN_TIMEOUT_S = 30.0


@contextmanager
def embedded_stack(config: Config) -> Iterator[Stack]:
    """The demo's tools on an in-process worker, for as long as the block runs."""
    app = Celery("throttle-demo", broker="memory://localhost/", backend="cache+memory://")
    app.conf.broker_transport_options = {"polling_interval": POLLING_INTERVAL_S}
    app.conf.result_cache_max = RESULT_CACHE_MAX
    app.conf.worker_hijack_root_logger = False
    store = fakeredis.FakeRedis()
    throttle = Throttle(app, config, redis_client=store, prefix=PREFIX)
    tasks = register_tools(throttle)
    with start_worker(
        app, pool="threads", concurrency=WORKER_THREADS, perform_ping_check=False,
        loglevel="WARNING", shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    ):
        yield Stack(
            mode="embedded",
            app=app,
            tasks=tasks,
            store=store,
            prefix=PREFIX,
            details=(
                f"one process: Celery memory:// broker, an in-process worker "
                f"({WORKER_THREADS} threads), fakeredis running the gate's Lua"
            ),
        )
    store.close()
