"""Part 1 of `bench.celery`: what throttle costs a no-op call on a limit that never binds.

The same no-op as a throttle tool and as a plain task of the same app, on the same node:
`n` calls `.delay()`-ed then `.get()`, alternated over `rounds`; the best run of each, and
the median of the ratios within each round. With `celery_defaults`, a third contender: the
no-op of an app left on Celery's defaults (node D0, same pool), what a user ran before; the
plain no-op against it is what throttle's safe settings cost on their own. The `floor` is
the plain no-op plus one trivial EVALSHA (`plain.floor`): what any gate asked once per call
costs, however little it does there.
"""

from __future__ import annotations

import time
from typing import Any

from bench.celery_setup import Bench
from bench.measures import Figure, percentile


def overhead(bench: Bench, n: int, rounds: int, pool: str = "prefork -c 2",
             celery_defaults: bool = False) -> list[Figure]:
    contenders = {"throttle": bench.tasks["noop"], "plain": bench.tasks["plain.noop"],
                  "floor": bench.tasks["plain.floor"]}
    if celery_defaults:
        contenders["defaults"] = bench.tasks["defaults.noop"]

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
    # The floor: what one round trip to Redis per call costs the plain no-op.
    floor = sorted(p / f for p, f in zip(seconds["plain"], seconds["floor"], strict=True))
    return [*_figures(part, rate, ratio, paired, seconds, rounds),
            Figure(part, "floor: plain no-op + one trivial EVALSHA / plain, median (min-max)",
                   f"{percentile(floor, 50):.3f} ({floor[0]:.2f}-{floor[-1]:.2f})",
                   raw=floor),
            *(_against_defaults(part, rate, seconds) if celery_defaults else [])]


def _figures(part: str, rate: dict[str, float], ratio: float, paired: list[float],
             seconds: dict[str, list[float]], rounds: int) -> list[Figure]:
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


def _against_defaults(part: str, rate: dict[str, float],
                      seconds: dict[str, list[float]]) -> list[Figure]:
    """Throttle against an app on Celery's defaults, and the share of that due to the settings
    alone (acks_late, prefetch 1, ...: the plain no-op of the same app as throttle)."""
    vs_defaults = rate["throttle"] / rate["defaults"]
    settings = rate["plain"] / rate["defaults"]
    paired = sorted(d / t for t, d in zip(seconds["throttle"], seconds["defaults"], strict=True))
    return [
        Figure(part, "Celery-defaults app no-op, calls/s", f"{rate['defaults']:.0f}",
               raw=seconds["defaults"]),
        Figure(part, "throttle / Celery-defaults app",
               f"{vs_defaults:.3f} (rounds {paired[0]:.2f}-{paired[-1]:.2f})", ">= 0.90",
               vs_defaults >= 0.9),
        Figure(part, "  of which the safe settings alone (plain / Celery-defaults app)",
               f"{settings:.3f}"),
        Figure(part, "  and throttle's own work (throttle / plain)",
               f"{rate['throttle'] / rate['plain']:.3f}"),
    ]
