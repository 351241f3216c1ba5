"""Contenders timed in interleaved slices, so load from other processes lands on all alike.

A run of `n` calls per contender is cut into slices of `SLICE` calls, and the slices of all
contenders alternate in an order that rotates from slice to slice; each contender's
seconds per run and its answers are kept for the report.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from throttle import Decision

SLICE = 1_000
WARMUP_MAX = 2_000

Call = Callable[[str], Any]
AsyncCall = Callable[[str], Awaitable[Any]]


@dataclass
class Contender:
    """One thing being timed: how to reset its keys and how to run it over a list of members."""

    key: str
    label: str
    run: Callable[[Sequence[str]], tuple[float, list[Any]]]
    reset: Callable[[], None]
    seconds: list[float] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    def best_rate(self, n: int) -> float:
        """Decisions per second of the fastest run."""
        return n / min(self.seconds)

    def spread(self) -> float:
        """(best - worst) / best over the runs, as a fraction of the best rate."""
        return 1 - min(self.seconds) / max(self.seconds)


def timed_sync(call: Call, members: Sequence[str]) -> tuple[float, list[Any]]:
    gc.collect()
    start = time.perf_counter()
    out = [call(member) for member in members]
    return time.perf_counter() - start, out


async def timed_async(
    call: AsyncCall, members: Sequence[str], in_flight: int
) -> tuple[float, list[Any]]:
    todo: Iterator[str] = iter(members)
    out: list[Any] = []

    async def worker() -> None:
        for member in todo:  # one shared iterator: at most `in_flight` calls at a time
            out.append(await call(member))

    gc.collect()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - start, out


def action_of(result: Any) -> str:
    if isinstance(result, Decision):
        return result.action.value
    if result is True:
        return "admit"
    if result is False:
        return "reject"
    return "ok"


def members(count: int) -> list[str]:
    """`count` fresh members (task ids)."""
    return [uuid.uuid4().hex for _ in range(count)]


def run_interleaved(
    contenders: Sequence[Contender], n: int, rounds: int, progress: Callable[[str], None]
) -> None:
    """Warm every contender up, then time `rounds` runs of `n` calls of each (into its
    `seconds` and `actions`).

    A run is cut into slices of SLICE calls, and the slices of all contenders alternate
    (in an order that rotates from slice to slice), so that a burst of load on the machine
    lands on every contender alike instead of on whichever ran at the time.
    """
    warmup = members(min(n, WARMUP_MAX))
    for contender in contenders:
        progress(f"warm-up: {contender.label}")
        contender.reset()
        contender.run(warmup)
    slices = range(0, n, SLICE)
    for round_no in range(rounds):
        for contender in contenders:
            contender.reset()
        spent = dict.fromkeys((c.key for c in contenders), 0.0)
        for index, first in enumerate(slices):
            size = min(SLICE, n - first)
            progress(f"run {round_no + 1}/{rounds}: {first + size:,}/{n:,} calls each")
            shift = (index + round_no) % len(contenders)
            for contender in [*contenders[shift:], *contenders[:shift]]:
                seconds, out = contender.run(members(size))
                spent[contender.key] += seconds
                contender.actions.update(action_of(result) for result in out)
                contender.calls += len(out)
        for contender in contenders:
            contender.seconds.append(spent[contender.key])

