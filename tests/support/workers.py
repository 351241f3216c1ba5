"""Real `celery worker` processes running `tests.apps.ledger`, the ledger they write, and the
checker that reads it: calls lost, bodies run twice, the most admissions in any window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import states

from tests.support.rabbit import delete_queues
from throttle.windows import most_in_window

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    """Worker subprocesses sharing one environment; `ledger()` reads what their bodies ran."""

    env: dict[str, str]
    queues: str
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, count: int, *, concurrency: int = 2, extra: Sequence[str] = ()) -> None:
        for _ in range(count):
            index = len(self.procs)
            log = open(self.log_dir / f"worker{index}.log", "wb")  # noqa: SIM115
            cmd = [
                sys.executable, "-m", "celery", "-A", "tests.apps.ledger", "worker",
                "-Q", self.queues, "-c", str(concurrency), "-n", f"w{index}-{os.getpid()}@%h",
                "-l", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
                *extra,
            ]
            self.procs.append(
                subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Wait until every started worker logs that it is ready."""
        deadline = time.monotonic() + timeout_s
        for index, proc in enumerate(self.procs):
            path = self.log_dir / f"worker{index}.log"
            while b"ready." not in path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {index} did not start:\n{path.read_text()[-3000:]}")
                time.sleep(0.1)

    def kill(self, index: int) -> None:
        """SIGKILL the whole worker node `index` (main process and its pool children)."""
        proc = self.procs[index]
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        proc.send_signal(signal.SIGKILL)
        for child in children:
            with suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def alive(self) -> int:
        """How many started worker nodes are still running."""
        return sum(proc.poll() is None for proc in self.procs)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def ledger(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every body execution the workers recorded, in the order they ran."""
    return [json.loads(raw) for raw in client.lrange(f"{prefix}:ledger", 0, -1)]


def await_outcomes(results: Sequence[Any], timeout_s: float) -> Counter[str]:
    """Wait for every call to end; count "result", "fallback", "failure" and "lost" (never
    ended within `timeout_s`)."""
    from throttle import outcome

    deadline = time.monotonic() + timeout_s
    counts: Counter[str] = Counter()
    for result in results:
        while result.state not in states.READY_STATES and time.monotonic() < deadline:
            time.sleep(0.02)
        if result.state == states.SUCCESS:
            counts[outcome(result)] += 1
        else:
            counts["lost" if result.state not in states.READY_STATES else "failure"] += 1
    return counts


@dataclass(frozen=True)
class LedgerCheck:
    """What the ledger says about a burst: how calls ended, bodies run twice, busiest window."""

    ended: Counter[str]
    run_twice: int
    most: int

    @property
    def lost(self) -> int:
        return self.ended["lost"]

    def __str__(self) -> str:
        return (f"{dict(self.ended)}, lost {self.lost}, bodies run twice {self.run_twice}, "
                f"most admitted in a window {self.most}")


def check_ledger(
    results: Sequence[Any], client: redis.Redis, prefix: str, *, window_s: float,
    timeout_s: float, tool: str | None = None,
) -> LedgerCheck:
    """Wait for `results`, then check the ledger (of `tool` only, if given)."""
    ended = await_outcomes(results, timeout_s)
    runs = [run for run in ledger(client, prefix) if tool is None or run["tool"] == tool]
    admitted = {run["id"]: run["admitted_at"] for run in runs}
    return LedgerCheck(ended, len(runs) - len(admitted),
                       int(most_in_window(list(admitted.values()), window_s)))


def clean_db(url: str) -> None:
    """Delete every key of a database number the tests own (never the shared db 0)."""
    client = redis.Redis.from_url(url)
    assert client.connection_pool.connection_kwargs.get("db", 0) != 0, "db 0 is shared"
    keys = list(client.scan_iter(count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


@contextmanager
def cluster(
    tmp_path: Path,
    *,
    redis_url: str,
    prefix: str,
    config: dict[str, Any],
    broker_url: str,
    backend_url: str,
    env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A worker cluster for `config`'s tools; stopped afterwards, then its RabbitMQ queues
    deleted (a Redis broker's databases are emptied by the `redis_dbs` fixture)."""
    full_env = {
        **os.environ,
        "THROTTLE_REDIS_URL": redis_url,
        "THROTTLE_BROKER_URL": broker_url,
        "THROTTLE_RESULT_BACKEND": backend_url,
        "THROTTLE_PREFIX": prefix,
        "THROTTLE_TEST_CONFIG": json.dumps(config),
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    queues = ",".join(f"tool.{name}" for name in config["tools"])
    group = Cluster(env=full_env, queues=queues, log_dir=tmp_path)
    try:
        yield group
    finally:
        group.stop()
        if urlsplit(broker_url).scheme in ("amqp", "pyamqp"):
            # On the tests' server even when the workers reached it through a relay.
            delete_queues(group.queues.split(","))
