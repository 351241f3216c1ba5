"""A Celery app whose tools record every execution in a Redis ledger (with Redis TIME).

Configured by the environment so a test can run it in real worker processes:
  THROTTLE_TEST_CONFIG   the tools config as JSON (see `throttle.load_config`)
  THROTTLE_PREFIX        the gate's key prefix; the ledger is the list <prefix>:ledger
  THROTTLE_REDIS_URL, THROTTLE_BROKER_URL, THROTTLE_RESULT_BACKEND
  THROTTLE_TEST_BODY_S   seconds each body sleeps (default 0)
  THROTTLE_TEST_POISON   a value of `n` whose body kills its own process
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery, current_task

from throttle import Throttle, load_config

redis_url = os.environ["THROTTLE_REDIS_URL"]
prefix = os.environ["THROTTLE_PREFIX"]
app = Celery(
    "ledger",
    broker=os.environ.get("THROTTLE_BROKER_URL", redis_url),
    backend=os.environ.get("THROTTLE_RESULT_BACKEND", redis_url),
)
app.conf.worker_hijack_root_logger = False
config = load_config(json.loads(os.environ["THROTTLE_TEST_CONFIG"]))
throttle = Throttle(app, config, redis_url, prefix=prefix)
ledger = redis.Redis.from_url(redis_url)
body_s = float(os.environ.get("THROTTLE_TEST_BODY_S", "0"))
poison = os.environ.get("THROTTLE_TEST_POISON")


def _make(tool: str) -> Any:
    def body(n: int, **_: Any) -> dict[str, Any]:
        if poison is not None and str(n) == poison:
            os.kill(os.getpid(), signal.SIGKILL)
        sec, usec = ledger.time()
        entry = {"id": current_task.request.id, "tool": tool, "n": n, "at": sec + usec / 1e6,
                 "pid": os.getpid(), "delays": getattr(current_task.request, "throttle_delays", 0),
                 "eta": current_task.request.eta,
                 "admitted_at": getattr(current_task.request, "throttle_admitted_at", None)}
        ledger.rpush(f"{prefix}:ledger", json.dumps(entry))
        if body_s:
            time.sleep(body_s)
        return {"n": n}

    body.__name__ = tool
    return body


tasks = {name: throttle.tool(name)(_make(name)) for name in config.tools}
