"""The real thing: the gate on Redis and one `celery -A workers worker` process per tool.

The scaled config goes to a TOML file the workers load (THROTTLE_CONFIG); the gate's keys
get a prefix of this run's own, deleted at the end with the results and queued messages.
With `keep_config` (`throttle demo --keep`) the run uses the default prefix, writes the
scaled config there and deletes nothing, so `throttle status`, `top` and the exporter with
their default settings see it during and after the run. The banner prints the `status`,
`top` and `exporter` command lines that read this run.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import tomli_w
from celery import Celery

from throttle.config import Config
from throttle.config_file import load_config
from throttle.demo.seed import DEMO_TOOLS
from throttle.demo.stack import RESULT_CACHE_MAX, Stack, register_tools
from throttle.errors import ThrottleError
from throttle.keys import DEFAULT_PREFIX
from throttle.routing import Throttle
from throttle.store import mask_url

WORKER_CONCURRENCY = 2
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


class DemoError(ThrottleError):
    """The demo cannot run as asked (a store does not answer, a worker does not start)."""


@contextmanager
def real_stack(document: Mapping[str, Any], redis_url: str, broker_url: str,
               keep_config: Path | None = None) -> Iterator[Stack]:
    """Worker processes for the demo's tools, stopped (and, unless kept, cleaned up) after
    the block. `keep_config`: where the scaled config is kept; the run then uses the
    default prefix and leaves its keys."""
    for url in (redis_url, broker_url):
        _check_answers(url)
    prefix = DEFAULT_PREFIX if keep_config else f"throttle-demo-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="throttle-demo-") as folder:
        config_path = keep_config or Path(folder) / "tools.toml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(tomli_w.dumps(document), encoding="utf-8")
        config = load_config(config_path)
        missing = [tool for tool in DEMO_TOOLS if tool not in config.tools]
        if missing:
            raise DemoError(
                f"the workers serve {', '.join(DEMO_TOOLS)}; the config lacks {missing}"
            )
        app = Celery("throttle-demo", broker=broker_url, backend=broker_url)
        app.conf.result_cache_max = RESULT_CACHE_MAX
        tasks = register_tools(Throttle(app, config, redis_url, prefix=prefix))
        store = redis.Redis.from_url(redis_url)
        env = {
            **os.environ, "THROTTLE_CONFIG": str(config_path), "THROTTLE_PREFIX": prefix,
            "THROTTLE_REDIS_URL": redis_url, "THROTTLE_BROKER_URL": broker_url,
            "THROTTLE_RESULT_BACKEND": broker_url,
        }
        workers = _Workers(env, Path(folder), prefix)
        try:
            workers.start(config)
            workers.wait_ready(app)
            yield Stack(
                mode="real", app=app, tasks=tasks, store=store, prefix=prefix,
                details=(
                    f"gate on Redis {mask_url(redis_url)} (keys {prefix}:*), broker "
                    f"{mask_url(broker_url)}, {len(workers.procs)} worker processes "
                    f"(celery -A workers worker -Q tool.<name> -c {WORKER_CONCURRENCY})\n"
                    "Watch this run from another terminal"
                    f"{' (its keys stay after it)' if keep_config else ' while it runs'}:\n"
                    + "\n".join(f"  {line}" for line in
                                watch_commands(redis_url, broker_url, prefix, config_path))
                ),
                kept=keep_config is not None,
            )
        finally:
            workers.stop()
            if keep_config is None:
                _clean(app, store, prefix, config)
            store.close()


def watch_commands(redis_url: str, broker_url: str, prefix: str, config: Path) -> list[str]:
    """`throttle status`, `top` and `exporter` command lines reading this run's keys and config.

    A password in a URL is shown masked (put it back to run them).
    """
    sources = ["--redis-url", mask_url(redis_url), "--broker-url", mask_url(broker_url),
               *(["--prefix", prefix] if prefix != DEFAULT_PREFIX else []),
               "--config", str(config)]
    return [shlex.join(["throttle", "status", *sources]), shlex.join(["throttle", "top", *sources]),
            shlex.join(["throttle", "exporter", "--port", "9808", *sources])]


def _check_answers(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise DemoError(f"Redis at {mask_url(url)} does not answer ({exc})") from None
    finally:
        client.close()


class _Workers:
    """The worker processes this demo started (each in its own process group)."""

    def __init__(self, env: dict[str, str], log_dir: Path, prefix: str) -> None:
        self.env, self.log_dir, self.prefix = env, log_dir, prefix
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, config: Config) -> None:
        host = socket.gethostname()
        for tool in config.tools.values():
            name = f"{self.prefix}-{tool.name}@{host}"
            with open(self.log_dir / f"{tool.name}.log", "wb") as log:
                self.procs[name] = subprocess.Popen(
                    [
                        sys.executable, "-m", "celery", "-A", "workers", "worker",
                        "-Q", tool.queue, "-c", str(WORKER_CONCURRENCY), "-n", name,
                        "-l", "WARNING", "--without-gossip", "--without-mingle",
                        "--without-heartbeat",
                    ],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )

    def wait_ready(self, app: Celery) -> None:
        """Wait until every worker answers a ping; fail with its log if one exits."""
        waiting = set(self.procs)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            for name in list(waiting):
                if self.procs[name].poll() is not None:
                    raise DemoError(f"worker {name} exited at start:\n{self._log_tail(name)}")
            if time.monotonic() > deadline:
                raise DemoError(f"workers {sorted(waiting)} did not answer within "
                                f"{READY_TIMEOUT_S:.0f}s")
            for reply in app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
                waiting -= set(reply)

    def _log_tail(self, name: str) -> str:
        tool = name.split("@")[0].removeprefix(f"{self.prefix}-")
        lines = (self.log_dir / f"{tool}.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-30:])

    def stop(self) -> None:
        stop_processes(self.procs.values())


def stop_processes(
    procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """SIGTERM each process (started with `start_new_session=True`); its process group is
    killed if it does not exit within `timeout_s`."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _clean(app: Celery, store: redis.Redis, prefix: str, config: Config) -> None:
    """Delete the gate's keys of this run and purge its queues (messages left by a stop)."""
    batch = list(store.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(batch), 500):
        store.delete(*batch[start : start + 500])
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for tool in config.tools.values():
            channel.queue_purge(tool.queue)
