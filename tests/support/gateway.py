"""`throttle gateway` and `throttle stub-llm` as subprocesses on 127.0.0.1, for the tests.

Each is started with `--port 0` and is ready once it prints "listening on http://...";
its output goes to a log file the tests read (for leaks, and on failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]


class CommandServer:
    """`python -m throttle.cli COMMAND --port 0 ARGS...`, stopped with `stop()`."""

    def __init__(self, log: Path, command: str, *args: str,
                 env: Mapping[str, str] | None = None, timeout_s: float = 30) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "throttle.cli", command, "--port", "0", *args],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            )
        deadline = time.monotonic() + timeout_s
        while "listening on http://" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`throttle {command}` did not start:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        self.url = self.text().split("listening on ", 1)[1].split()[0]  # http://host:port/v1
        self.root = self.url.removesuffix("/v1")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StubServer(CommandServer):
    """The OpenAI-compatible stub upstream, with its admin endpoints."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__(log, "stub-llm", *args)
        self.admin = httpx.Client(base_url=self.root, timeout=10)

    def configure(self, **settings: Any) -> dict[str, Any]:
        response = self.admin.post("/_stub/config", json=settings)
        response.raise_for_status()
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        return dict(self.admin.get("/_stub/stats").json())

    def stop(self) -> None:
        super().stop()
        self.admin.close()


def every_value(client: redis.Redis, match: str = "*") -> Iterator[bytes]:
    """Every key name and value of a database (strings, hashes, lists, sets, sorted sets)."""
    for key in client.scan_iter(match=match, count=1000):
        yield key
        kind = client.type(key).decode()
        if kind == "string":
            yield client.get(key) or b""
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                yield field + b"=" + value
        elif kind == "list":
            yield from client.lrange(key, 0, -1)
        elif kind == "set":
            yield from client.smembers(key)
        elif kind == "zset":
            yield from (member for member, _ in client.zrange(key, 0, -1, withscores=True))
