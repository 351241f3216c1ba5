"""The Celery apps `python -m bench.celery` measures, and the worker processes that run them.

`celery -A bench.apps worker` builds one app from the environment:
  BENCH_APP            "throttle" (default): `Throttle(app, config)` with one tool per entry of
                       BENCH_CONFIG, plus the plain tasks below on the same app;
                       "plain": a bare Celery app with the same queue settings (JSON only,
                       acks_late, reject on worker lost, prefetch 1, visibility timeout) and the
                       plain tasks, but without Throttle and its FireDueTimers bootstep;
                       "defaults": a bare Celery app left on Celery's defaults (what a user
                       ran before throttle), whose no-op is `defaults.noop`.
  BENCH_CONFIG         the tools config as JSON (see `throttle.load_config`)
  BENCH_PREFIX         the gate's key prefix; bodies record into lists <prefix>:rec:<run>
  BENCH_REDIS_URL      the gate's and the records' Redis
  BENCH_BROKER_URL, BENCH_RESULT_BACKEND
  BENCH_RATE_LIMIT     Celery's own `rate_limit` of the `plain.rated` task (e.g. "20/s")

`plain.floor` is the no-op plus one trivial EVALSHA: what one round trip to Redis per call
costs, whatever a gate does there. Every task takes keyword arguments only. `run` set: the
body records, in one round trip, Redis TIME at its start with what the worker knew (delays,
ETA, admission time, node, and when the pool process began the call: Celery's
`task_prerun`, before the gate is asked).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery, current_task
from celery.signals import task_prerun, worker_ready

from throttle import Throttle, load_config
from throttle.routing import apply_defaults

ROOT = Path(__file__).resolve().parents[1]
# The settings Throttle applies that matter to a plain task, copied onto the baseline app.
# Redis TIME and the record in one round trip: the time is the body's start.
RECORD_LUA = """
local t = redis.call('TIME')
redis.call('RPUSH', KEYS[1], t[1] .. '.' .. string.format('%06d', tonumber(t[2])) .. ' ' .. ARGV[1])
return 1
"""


def build(env: Mapping[str, str]) -> tuple[Celery, Throttle | None, dict[str, Any]]:
    """The app, its Throttle (None for the plain app) and its tasks by name."""
    redis_url = env["BENCH_REDIS_URL"]
    prefix = env["BENCH_PREFIX"]
    app = Celery(
        "bench",
        broker=env.get("BENCH_BROKER_URL", redis_url),
        backend=env.get("BENCH_RESULT_BACKEND", redis_url),
    )
    store = redis.Redis.from_url(redis_url)
    record = store.register_script(RECORD_LUA)
    trivial = store.register_script("return 1")

    def make(name: str) -> Any:
        def body(run: str = "", **_: Any) -> None:
            if run:
                request = current_task.request
                entry = [
                    getattr(request, "throttle_delays", 0) or 0,
                    request.eta,
                    getattr(request, "throttle_admitted_at", None),
                    request.hostname,
                    getattr(request, "bench_prerun_at", None),
                ]
                record(keys=[f"{prefix}:rec:{run}"], args=[json.dumps(entry)])

        body.__name__ = name
        return body

    tasks: dict[str, Any] = {}
    throttle: Throttle | None = None
    config = load_config(json.loads(env["BENCH_CONFIG"]))
    kind = env.get("BENCH_APP", "throttle")
    if kind == "defaults":
        app.conf.task_routes = {"defaults.noop": {"queue": "defaults.noop"}}
        return app, None, {"defaults.noop": app.task(make("noop"), name="defaults.noop")}
    if kind == "throttle":
        throttle = Throttle(app, config, redis_url, prefix=prefix)
        tasks = {name: throttle.tool(name)(make(name)) for name in config.tools}
    else:  # the same settings, without throttle's queues, tasks and bootsteps
        apply_defaults(app, config)
    routes = app.conf.task_routes or {}
    app.conf.task_routes = {**routes, "plain.noop": {"queue": "plain.noop"}}
    tasks["plain.noop"] = app.task(make("noop"), name="plain.noop")
    # The no-op plus one round trip to Redis (a script of `return 1`): the floor of any gate
    # asked once per call, however little it does there.
    app.conf.task_routes = {**app.conf.task_routes, "plain.floor": {"queue": "plain.floor"}}
    floor_key = [f"{prefix}:floor"]

    def floor(**_: Any) -> None:
        trivial(keys=floor_key, args=["1"])

    tasks["plain.floor"] = app.task(floor, name="plain.floor")
    tasks["plain.rated"] = app.task(
        make("rated"), name="plain.rated", rate_limit=env.get("BENCH_RATE_LIMIT") or None
    )
    return app, throttle, tasks


@task_prerun.connect
def _note_prerun(task: Any = None, **_: Any) -> None:
    """When the pool process began the call (the ETA and the pool's wait lie before it)."""
    if task is not None:
        task.request.bench_prerun_at = time.time()


@worker_ready.connect
def _say_ready(sender: Any = None, **_: Any) -> None:
    # Workers run at -l WARNING (no per-task log lines); Celery's own "ready." is INFO.
    print(f"bench worker {getattr(sender, 'hostname', '?')} ready.", file=sys.stderr, flush=True)


if "BENCH_PREFIX" in os.environ:
    app, throttle, tasks = build(os.environ)


@dataclass
class Node:
    """One `celery worker` process and its log."""

    name: str
    app: str
    queues: Sequence[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    children: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def start_nodes(
    nodes: Sequence[Node],
    env: Mapping[str, str],
    *,
    concurrency: int = 2,
    pool: str = "prefork",
    loglevel: str = "WARNING",
    timeout_s: float = 60,
) -> None:
    """Start every node (`-P pool -c concurrency`), then wait until each is ready."""
    for node in nodes:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.apps",
            "worker",
            "-Q",
            ",".join(node.queues),
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-n",
            f"{node.name}@%h",
            "-l",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        full_env = {**os.environ, **env, "BENCH_APP": node.app, "PYTHONPATH": str(ROOT)}
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
                cmd, env=full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        while b" ready." not in node.log.read_bytes():
            if node.proc is None or node.proc.poll() is not None or time.monotonic() > deadline:
                tail = node.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"worker {node.name} did not start:\n{tail}")
            time.sleep(0.1)
        node.children = _children(node.pid)


def stop_nodes(nodes: Sequence[Node], timeout_s: float = 20) -> None:
    """SIGTERM the nodes we started; SIGKILL a node (and its pool) still there after timeout_s."""
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.children = _children(node.pid) or node.children
            node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        if node.proc is None:
            continue
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for child in node.children:  # its pool processes, still children of a live node
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
            node.proc.kill()
            node.proc.wait()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(part) for part in out.split()]
