"""What the Celery benchmark reads and reports: figures, percentiles, and what /proc tells
about processes (resident memory, CPU ticks)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


@dataclass
class Figure:
    part: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target
    raw: Any = None


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (psutil if installed, else /proc)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    return int(psutil.Process(pid).memory_info().rss)


def _cpu_ticks(groups: Sequence[Sequence[int]]) -> list[int]:
    """Ticks the machine was busy so far, then the ticks each group of pids ran (/proc)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    out = [sum(fields) - fields[3] - fields[4]]  # all but idle and iowait
    for pids in groups:
        out.append(0)
        for pid in pids:
            with suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[-1] += int(stat[11]) + int(stat[12])  # utime, stime
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes `pids` have run so far (/proc)."""
    ticks = 0
    for pid in pids:
        with suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(stat[11]) + int(stat[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def local_redis_pid(client: redis.Redis) -> int | None:
    """The pid of the Redis server if it runs on this machine, else None."""
    pid = int(client.info("server").get("process_id", 0))
    with suppress(OSError):
        if "redis" in Path(f"/proc/{pid}/comm").read_text():
            return pid
    return None


@contextmanager
def cpu_use(ours: Sequence[int], redis_pid: int | None) -> Iterator[dict[str, float]]:
    """Yields a dict that holds, afterwards, the cores Redis and all other processes used."""
    out: dict[str, float] = {}
    groups = [ours, [redis_pid] if redis_pid else []]
    before, start = _cpu_ticks(groups), time.monotonic()
    yield out
    busy, own, server = (b - a for a, b in zip(before, _cpu_ticks(groups), strict=True))
    per_s = os.sysconf("SC_CLK_TCK") * (time.monotonic() - start)
    out.update(redis=server / per_s, others=(busy - own - server) / per_s)


def wait_until(done: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
