"""Part 1 of `bench.celery`: what throttle costs a no-op call on a limit that never binds.

The same no-op as a throttle tool and as a plain task of the same app, on the same node:
`n` calls `.delay()`-ed then `.get()`, alternated over `rounds`; the best run of each, and
the median of the ratios within each round. With `celery_defaults`, a third contender: the
no-op of an app left on Celery's defaults (node D0, same pool), what a user ran before; the
plain no-op against it is what throttle's safe settings cost on their own. The `floor` is
the plain no-op plus one trivial EVALSHA (`plain.floor`): what any gate asked once per call
costs, however little it does there.

With the node given, each run also reads the CPU its processes used (/proc): the caller's
`.delay()` and `.get()` (this process), the node's main process, its pool processes and the
Redis server, per call; the figures compare the medians over the rounds, plain against
throttle and the floor.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.apps import Node
from bench.celery_setup import Bench
from bench.measures import Figure, cpu_seconds, local_redis_pid, percentile

ON_NODE = ("plain", "throttle", "floor")  # the contenders the node runs


def overhead(bench: Bench, n: int, rounds: int, pool: str = "prefork -c 2",
             celery_defaults: bool = False, node: Node | None = None) -> list[Figure]:
    contenders = {"throttle": bench.tasks["noop"], "plain": bench.tasks["plain.noop"],
                  "floor": bench.tasks["plain.floor"]}
    if celery_defaults:
        contenders["defaults"] = bench.tasks["defaults.noop"]

    redis_pid = local_redis_pid(bench.gate)
    groups = {"worker main": [node.pid]} if node else {}
    if node and node.children:  # (a gevent node runs its pool in its main process)
        groups["pool processes"] = node.children
    if redis_pid:
        groups["Redis"] = [redis_pid]
    cpu: dict[str, list[list[float]]] = {name: [] for name in ON_NODE}

    def timed(task: Any, count: int, name: str = "") -> float:
        before = [cpu_seconds(pids) for pids in groups.values()]
        caller = time.process_time()
        start = time.perf_counter()
        results = [task.delay() for _ in range(count)]
        sent = time.process_time()
        for result in results:
            result.get(timeout=120)
        seconds = time.perf_counter() - start
        if node and name in cpu:
            used = [sent - caller, time.process_time() - sent, *(
                cpu_seconds(pids) - b for pids, b in zip(groups.values(), before, strict=True))]
            cpu[name].append([1e6 * s / count for s in used])
        return seconds

    for task in contenders.values():
        timed(task, 100)  # warm up: connections, scripts, pool processes
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(rounds):
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            seconds[name].append(timed(contenders[name], n, name))
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
            *(_against_defaults(part, rate, seconds) if celery_defaults else []),
            *(_cpu_per_call(part, cpu, [".delay()", ".get()", *groups]) if node else [])]


def _cpu_per_call(part: str, cpu: dict[str, list[list[float]]],
                  processes: list[str]) -> list[Figure]:
    """CPU µs per call of each process, plain -> throttle (floor), medians over the rounds."""
    def median(name: str, index: int) -> float:
        return statistics.median(run[index] for run in cpu[name])

    figures = []
    for index, process in enumerate(processes):
        plain, throttle, floor = (median(name, index) for name in ("plain", "throttle", "floor"))
        figures.append(Figure(
            part, f"CPU µs per call, {process}: plain -> throttle (floor)",
            f"{plain:.0f} -> {throttle:.0f} ({throttle - plain:+.0f}) ({floor:.0f})",
            raw={name: [run[index] for run in cpu[name]] for name in cpu}))
    return figures


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
