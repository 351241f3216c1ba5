"""Instructions a Celery call costs, counted by callgrind: repeatable on a busy machine.

One process drives `n` calls of a no-op the way a worker does, inside `functools.reduce`,
so that callgrind counts only them (`--toggle-collect=functools_reduce`, other threads not
counted; registrations and metrics are sent by a flush inside the counted part, as one batch):

  pool     a prefork pool process: `fast_trace_task` on messages published by `.delay()`
           and taken from the broker first (not counted)
  delay    the caller: `.delay()`, then the registrations it queued
  intake   the worker's main process: throttle's message checks (throttle/intake.py)

```sh
valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce \\
  --callgrind-out-file=/tmp/cg.out .venv/bin/python -m bench.celery_instructions pool throttle
callgrind_annotate /tmp/cg.out | head   # PROGRAM TOTALS / n = instructions a call
```

`who` is `throttle` (a tool that never binds), `plain` (the same no-op as a plain task of the
same app) or `floor` (the plain no-op plus one trivial EVALSHA). The Redis URL comes from
`THROTTLE_REDIS_URL`; the broker and result databases (`--dbs`, default 6 and 7) are
**emptied** first; the gate's keys go to database 5 under a fresh prefix. Run with
PYTHONHASHSEED=0; the counts then repeat to about 0.5%.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

TOOLS = {"broker": {"visibility_timeout": "1h"},
         "tools": {"noop": {"limits": ["1000000/1s"], "max_delay": "60s"}}}
TASKS = {"throttle": "tool.noop", "plain": "plain.noop", "floor": "plain.floor"}
WARM = 20  # calls made first, not counted: connections, scripts, caches


def _db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("pool", "delay", "intake"))
    parser.add_argument("who", choices=tuple(TASKS))
    parser.add_argument("--n", type=int, default=500, help="calls counted")
    parser.add_argument("--dbs", type=int, nargs=2, default=(6, 7), metavar=("BROKER", "RESULTS"))
    args = parser.parse_args()
    base = os.environ.get("THROTTLE_REDIS_URL", "redis://127.0.0.1:6379/0")
    if args.mode == "intake" and args.who != "throttle":
        raise SystemExit("intake: only a tool's messages are checked (who = throttle)")
    if 0 in args.dbs:
        raise SystemExit("db 0 is shared: the broker and result databases are emptied")
    os.environ.update({
        "BENCH_REDIS_URL": _db(base, 5), "BENCH_BROKER_URL": _db(base, args.dbs[0]),
        "BENCH_RESULT_BACKEND": _db(base, args.dbs[1]),
        "BENCH_PREFIX": f"bench-instructions-{uuid.uuid4().hex[:8]}",
        "BENCH_CONFIG": json.dumps(TOOLS),
    })
    for db in args.dbs:
        redis.Redis.from_url(_db(base, db)).flushdb()
    from throttle import registrar
    from throttle.monitor import metrics

    # Sent by the flush below, in this thread, rather than by their threads meanwhile.
    registrar.LINGER_S = metrics.FLUSH_INTERVAL_S = 3600.0
    from bench import apps  # (builds the app from the variables above)

    run(args.mode, apps.app.tasks[TASKS[args.who]], apps.app, apps.throttle, args.n)


def run(mode: str, task: Any, app: Any, throttle: Any, n: int) -> None:
    """Make WARM calls, then the `n` counted ones (inside functools.reduce)."""
    from celery.app import trace
    from celery.worker.request import Request
    from kombu import Consumer, Queue

    from throttle.intake import message_problem, visibility_s
    from throttle.monitor import metrics

    def flush(*_: Any) -> None:
        if throttle is not None:
            throttle.flush_registrations()
        metrics.flush()

    if mode == "delay":
        for _ in range(WARM):
            task.delay()
        flush()
        functools.reduce(lambda _, __: task.delay(), range(n), None)
        functools.reduce(flush, range(1), None)
        return
    for _ in range(WARM + n):
        task.delay()
    flush()
    messages: list[Any] = []
    queue = app.amqp.router.route({}, task.name)["queue"].name
    with app.connection_for_read() as conn, Consumer(
        conn, [Queue(queue, routing_key=queue)], accept=["json"], no_ack=True,
        callbacks=[lambda _, message: messages.append(message)],
    ):
        while len(messages) < WARM + n:
            conn.drain_events(timeout=10)
    if mode == "intake":
        limit_s = visibility_s(app)
        functools.reduce(lambda _, m: message_problem(
            m.headers, m.body, lambda: m.payload, task.tool.max_args_bytes, limit_s),
            messages[WARM:], None)
        return
    hostname = f"instructions@{socket.gethostname()}"
    trace.setup_worker_optimizations(app, hostname)
    task.__trace__ = trace.build_tracer(task.name, task, app.loader, hostname, app=app)
    calls = [(r._type, r.id, r._request_dict, r._body, r._content_type, r._content_encoding)
             for r in (Request(m, app=app, hostname=hostname) for m in messages)]
    for call in calls[:WARM]:
        trace.fast_trace_task(*call)
    flush()
    functools.reduce(lambda _, call: trace.fast_trace_task(*call), calls[WARM:], None)
    functools.reduce(flush, range(1), None)


if __name__ == "__main__":
    main()
