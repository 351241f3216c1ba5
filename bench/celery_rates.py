"""Part 4 of `bench.celery`: throttle's steady rate against Celery's own `rate_limit`.

A burst of `n` at `rate`/s, interleaved, on one node then two: throttle's tool (and its
`slot_margin 0ms` twin) against the plain app's task with `rate_limit`; the steady rate
from the 10% to the 90% point and the most body starts in any 1 s window.
"""

from __future__ import annotations

import uuid
from typing import Any

from bench.celery_setup import Bench
from bench.measures import Figure, wait_until
from throttle.windows import most_in_window


def rates(bench: Bench, n: int, rate: int) -> list[Figure]:
    plain = bench.tasks["plain.rated"]
    rounds = [
        [
            ("throttle", bench.tasks["rated_one"], None, 1),
            ("throttle, slot_margin 0ms", bench.tasks["rated_nomargin"], None, 1),
            ("celery rate_limit", plain, "plain.rated_one", 1),
        ],
        [
            ("throttle", bench.tasks["rated_two"], None, 2),
            ("celery rate_limit", plain, "plain.rated_two", 2),
        ],
    ]
    figures = []
    for contenders in rounds:
        runs = {label: uuid.uuid4().hex[:8] for label, *_ in contenders}
        for _ in range(n):  # interleaved: no contender gets a head start
            for label, task, queue, _nodes in contenders:
                options = {"queue": queue} if queue else {}
                task.apply_async(kwargs={"run": runs[label]}, ignore_result=True, **options)
        cap_s = n / rate * 1.5 + 5
        ids = list(runs.values())
        wait_until(lambda ids=ids: all(bench.recorded(r) >= n for r in ids), cap_s, 0.5)
        cut = bench.redis_now()
        for label, _task, _queue, nodes in contenders:
            figures += _rate_figures(label, nodes, bench.records(runs[label]), n, rate, cut)
    return figures



def _rate_figures(
    label: str, nodes: int, recs: list[dict[str, Any]], n: int, rate: int, cut: float
) -> list[Figure]:
    starts = sorted(r["at"] for r in recs)
    # From the 10% point, a whole number of limit-sized groups up to the 90% point: the
    # same phase of throttle's window-by-window admissions at both ends.
    lo = round(0.1 * (n - 1))
    hi = lo + rate * ((round(0.9 * (n - 1)) - lo) // rate)
    if len(starts) > hi:
        steady = (hi - lo) / (starts[hi] - starts[lo])
    elif len(starts) > lo:  # an unfinished run: what it ran until we stopped waiting
        steady = (len(starts) - 1 - lo) / (cut - starts[lo])
    else:
        steady = len(starts) / max(1e-9, cut - starts[0]) if starts else 0.0
    top = int(most_in_window(starts, 1.0))
    part = f"4 rate {rate}/s, {nodes} node{'s' if nodes > 1 else ''}"
    done = f"{len(starts)}/{n} ran" + ("" if len(starts) >= n else " before cut-off")
    throttled = label.startswith("throttle")
    default = label == "throttle"
    steady_ok = steady / rate >= 0.98 and steady / rate <= 1.0 if default else None
    return [
        Figure(
            part,
            f"{label}: steady rate / limit (10%-90%; {done})",
            f"{steady / rate:.3f}",
            ">= 0.98, <= 1.0" if default else ("" if throttled else "reference"),
            steady_ok,
            raw={"steady_per_s": steady, "ran": len(starts)},
        ),
        Figure(
            part,
            f"{label}: most in any 1 s window / limit",
            f"{top / rate:.2f}",
            "<= 1.0" if throttled else "reference",
            top <= rate if throttled else None,
        ),
    ]
