"""A Celery app whose tools record every execution in a Redis ledger (with Redis TIME).

`celery -A tests.apps.ledger worker` builds it from the environment; a test builds the
same app for its own process with `build(env)`.
  THROTTLE_TEST_CONFIG   the tools config as JSON (see `throttle.load_config`)
  THROTTLE_TEST_CONFIG_FILE  a tools file to load instead (so that SIGHUP can reload it)
  THROTTLE_PREFIX        the gate's key prefix; the ledger is the list <prefix>:ledger,
                         and <prefix>:ended maps task ids to when their bodies ended
  THROTTLE_REDIS_URL, THROTTLE_BROKER_URL, THROTTLE_RESULT_BACKEND
  THROTTLE_TEST_BODY_S   seconds each body sleeps (default 0)
  THROTTLE_TEST_POISON   a value of `n` whose body kills its own process (counting each
                         attempt in <prefix>:poisoned first)
  THROTTLE_TEST_LEDGER_URL  where the ledger is written (default THROTTLE_REDIS_URL), so
                         the gate's store can be taken down while the ledger keeps working
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, current_task

from throttle import Throttle, load_config


def build(env: Mapping[str, str]) -> tuple[Celery, Throttle, dict[str, Any]]:
    """The app, its Throttle and one task per configured tool."""
    redis_url = env["THROTTLE_REDIS_URL"]
    prefix = env["THROTTLE_PREFIX"]
    app = Celery(
        "ledger",
        broker=env.get("THROTTLE_BROKER_URL", redis_url),
        backend=env.get("THROTTLE_RESULT_BACKEND", redis_url),
    )
    app.conf.worker_hijack_root_logger = False
    config_file = env.get("THROTTLE_TEST_CONFIG_FILE")
    config = load_config(config_file or json.loads(env["THROTTLE_TEST_CONFIG"]))
    throttle = Throttle(app, config, redis_url, prefix=prefix)
    store = redis.Redis.from_url(env.get("THROTTLE_TEST_LEDGER_URL", redis_url))
    body_s = float(env.get("THROTTLE_TEST_BODY_S", "0"))
    poison = env.get("THROTTLE_TEST_POISON")

    def make(tool: str) -> Any:
        def body(n: int, **_: Any) -> dict[str, Any]:
            if poison is not None and str(n) == poison:
                store.incr(f"{prefix}:poisoned")
                os.kill(os.getpid(), signal.SIGKILL)
            request = current_task.request
            running = store.incr(f"{prefix}:running:{tool}")
            try:
                sec, usec = store.time()
                entry = {
                    "id": request.id, "tool": tool, "n": n, "at": sec + usec / 1e6,
                    "pid": os.getpid(), "delays": getattr(request, "throttle_delays", 0),
                    "eta": request.eta, "running": running,
                    "admitted_at": getattr(request, "throttle_admitted_at", None),
                }
                store.rpush(f"{prefix}:ledger", json.dumps(entry))
                if body_s:
                    time.sleep(body_s)
            finally:
                store.decr(f"{prefix}:running:{tool}")
                sec, usec = store.time()
                store.hset(f"{prefix}:ended", request.id, sec + usec / 1e6)
            return {"n": n}

        body.__name__ = tool
        return body

    tasks = {name: throttle.tool(name)(make(name)) for name in config.tools}
    return app, throttle, tasks


if "THROTTLE_TEST_CONFIG" in os.environ:
    app, throttle, tasks = build(os.environ)
