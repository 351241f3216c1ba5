"""Part 1 of `bench.celery`: what throttle costs a no-op call on a limit that never binds.

The same no-op as a throttle tool and as a plain task of the same app, on the same node:
`n` calls `.delay()`-ed then `.get()`, alternated over `rounds`; the best run of each, and
the median of the ratios within each round.
"""

from __future__ import annotations

import time
from typing import Any

from bench.celery_setup import Bench
from bench.measures import Figure, percentile


def overhead(bench: Bench, n: int, rounds: int, pool: str = "prefork -c 2") -> list[Figure]:
    contenders = {"throttle": bench.tasks["noop"], "plain": bench.tasks["plain.noop"]}

    def timed(task: Any, count: int) -> float:
        start = time.perf_counter()
        results = [task.delay() for _ in range(count)]
        for result in results:
            result.get(timeout=120)
        return time.perf_counter() - start

    for task in contenders.values():
        timed(task, 100)  # warm up: connections, scripts, pool processes
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(rounds):
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            seconds[name].append(timed(contenders[name], n))
    rate = {name: n / min(values) for name, values in seconds.items()}
    ratio = rate["throttle"] / rate["plain"]
    # Each round's two runs are back to back: their ratio shares the machine's state.
    paired = sorted(p / t for t, p in zip(seconds["throttle"], seconds["plain"], strict=True))
    part = f"1 overhead {pool}"
    return [
        Figure(
            part,
            "plain Celery no-op, calls/s",
            f"{rate['plain']:.0f}",
            raw=seconds["plain"],
        ),
        Figure(
            part,
            "throttle no-op (never binds), calls/s",
            f"{rate['throttle']:.0f}",
            raw=seconds["throttle"],
        ),
        Figure(part, "throttle / plain", f"{ratio:.3f}", ">= 0.90", ratio >= 0.9),
        Figure(
            part,
            f"throttle / plain within each round, median (min-max of {rounds})",
            f"{percentile(paired, 50):.3f} ({paired[0]:.2f}-{paired[-1]:.2f})",
            raw=paired,
        ),
    ]
