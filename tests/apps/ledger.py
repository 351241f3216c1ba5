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
  THROTTLE_TEST_TASK_OPTIONS  JSON: tool name -> Celery task options for its task
  THROTTLE_TEST_BUSY     a value of `n` whose body raises UpstreamBusy (a 60 s pause)
  THROTTLE_TEST_RETRY    a value of `n` whose body, once recorded, retries once (`self.retry`)
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

from throttle import Throttle, UpstreamBusy, load_config

BUSY_PAUSE_S = 60.0


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
    busy = env.get("THROTTLE_TEST_BUSY")
    retry_n = env.get("THROTTLE_TEST_RETRY")

    def make(tool: str) -> Any:
        def body(n: int, **_: Any) -> dict[str, Any]:
            if poison is not None and str(n) == poison:
                store.incr(f"{prefix}:poisoned")
                os.kill(os.getpid(), signal.SIGKILL)
            if busy is not None and str(n) == busy:
                raise UpstreamBusy(BUSY_PAUSE_S, "the test upstream is busy")
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
                if str(n) == retry_n and not request.retries:
                    raise current_task.retry(countdown=0)
                if body_s:
                    time.sleep(body_s)
            finally:
                store.decr(f"{prefix}:running:{tool}")
                sec, usec = store.time()
                store.hset(f"{prefix}:ended", request.id, sec + usec / 1e6)
            return {"n": n}

        body.__name__ = tool
        return body

    options = json.loads(env.get("THROTTLE_TEST_TASK_OPTIONS", "{}"))
    tasks = {name: throttle.tool(name, **options.get(name, {}))(make(name))
             for name in config.tools}
    tasks |= helpers(app, store, prefix)
    return app, throttle, tasks


def helpers(app: Celery, store: redis.Redis, prefix: str) -> dict[str, Any]:
    """Plain tasks on the default queue that record what canvases hand them:
    `collect` (a chain's next step, a chord's body, a link) and `record_error` (link_error)."""

    @app.task(name="helpers.collect", shared=False)
    def collect(result: Any, label: str) -> Any:
        store.rpush(f"{prefix}:collected:{label}", json.dumps(result))
        return result

    @app.task(name="helpers.record_error", shared=False)
    def record_error(request: Any, exc: BaseException, traceback: Any, label: str) -> None:
        entry = {"id": request.id, "type": type(exc).__name__, "message": str(exc)}
        store.rpush(f"{prefix}:errors:{label}", json.dumps(entry))

    return {"collect": collect, "record_error": record_error}


if "THROTTLE_TEST_CONFIG" in os.environ:
    app, throttle, tasks = build(os.environ)
