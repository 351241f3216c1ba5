"""Part 2 of `bench.celery`: a burst of 2,000 calls at a binding 100/1s on 3 nodes.

The whole burst is queued first, then the nodes consume it (add_consumer). The bodies
record their start (Redis TIME), admission, re-publish count and ETA: makespan against the
ideal, re-deliveries per delayed call, lateness against the ETA, and the most admitted and
started in any 1 s window.
"""

from __future__ import annotations

import math
import socket
import time
import uuid
from typing import Any

from bench.celery_setup import BURST_LIMIT, MAKESPAN_TARGET, PRIORITY_SEP, Bench
from bench.measures import Figure, mean, percentile, wait_until
from throttle import fallback_reason
from throttle.windows import most_in_window


def binding(bench: Bench, n: int, pool: str = "prefork -c 2", nodes: str = "T") -> list[Figure]:
    run = uuid.uuid4().hex[:8]
    ideal_s = n / BURST_LIMIT - 1
    start = time.monotonic()
    results = [bench.tasks["burst"].delay(run=run) for _ in range(n)]
    enqueue_s = time.monotonic() - start
    # The whole burst waits in the queue before any node consumes it: a real burst,
    # whatever the speed of this one enqueueing process.
    names = [f"{nodes}{index}@{socket.gethostname()}" for index in range(3)]
    replies = bench.app.control.add_consumer("tool.burst", destination=names, reply=True)
    if len(replies) != len(names):
        raise RuntimeError(f"add_consumer tool.burst answered {replies}")
    began = bench.redis_now()
    # First deliveries carry priority 9 (their own list), re-published calls priority 0.
    wait_until(lambda: not bench.broker.llen(f"tool.burst{PRIORITY_SEP}9"), 120, 0.05)
    first_pass_s = bench.redis_now() - began
    wait_until(lambda: bench.recorded(run) >= n, ideal_s * 1.6 + 30, 0.5)
    recs = bench.records(run)
    fallbacks = 0
    if len(recs) < n:
        fallbacks = sum(fallback_reason(result) is not None for result in results)
    admitted = [r["admitted"] for r in recs]
    makespan = max(admitted) - min(admitted)
    delayed = [r for r in recs if r["delays"] >= 1]
    redeliveries = [r["delays"] for r in delayed]
    late_ms = [(r["at"] - r["eta"]) * 1000 for r in delayed if r["eta"]]
    p50, p99 = percentile(late_ms, 50), percentile(late_ms, 99)
    calm_ms = [(r["at"] - r["eta"]) * 1000 for r in delayed if r["eta"] > began + first_pass_s]
    split = _lateness_split(delayed)
    top_admit, top_start = (int(most_in_window(times, 1.0))
                            for times in (admitted, [r["at"] for r in recs]))
    ratio = makespan / ideal_s
    cap = MAKESPAN_TARGET
    part = f"2 binding {BURST_LIMIT}/1s x3 {pool}"
    return [
        Figure(
            part,
            f"calls run / enqueued (fallbacks {fallbacks}; queued in {enqueue_s:.1f}s)",
            f"{len(recs)}/{n}",
            f"= {n}",
            len(recs) == n,
        ),
        Figure(
            part,
            f"makespan / ideal ({makespan:.2f}s / {ideal_s:.0f}s)",
            f"{ratio:.3f}",
            f"<= {cap:.2f}",
            ratio <= cap,
        ),
        Figure(
            part,
            f"re-deliveries per delayed call, mean (of {len(delayed)})",
            f"{mean(redeliveries):.3f}",
            "<= 1.0",
            mean(redeliveries) <= 1.0,
        ),
        Figure(
            part,
            "re-deliveries per delayed call, max (calls with >= 2)",
            f"{max(redeliveries, default=0)} ({sum(d >= 2 for d in redeliveries)})",
        ),
        Figure(
            part,
            "lateness vs ETA, p50 / p99 / max ms",
            f"{p50:.1f} / {p99:.1f} / {max(late_ms, default=math.nan):.1f}",
            "p99 <= 50",
            p99 <= 50,
        ),
        Figure(
            part,
            f"  of calls due after every call met the gate once ({first_pass_s:.1f}s), "
            f"p50 / p99 ms (of {len(calm_ms)})",
            f"{percentile(calm_ms, 50):.1f} / {percentile(calm_ms, 99):.1f}",
            raw={"first_pass_s": first_pass_s},
        ),
        Figure(
            part,
            "  latest 1% of delayed calls, mean ms: ETA -> a pool process began it "
            "-> admitted -> body",
            split,
        ),
        Figure(
            part,
            "most admitted in any 1 s window",
            f"{top_admit}",
            f"<= {BURST_LIMIT}",
            top_admit <= BURST_LIMIT,
        ),
        Figure(
            part,
            "most body starts in any 1 s window",
            f"{top_start}",
            f"<= {BURST_LIMIT}",
            top_start <= BURST_LIMIT,
        ),
    ]


def _lateness_split(delayed: list[dict[str, Any]]) -> str:
    """Where the latest 1% of delayed calls lost their time, mean ms: from the ETA until a
    pool process began the call (the ETA timer and the wait for a free process), then the
    gate (its round trip, and a wait slept out for a call that came back late), then the
    body's start."""
    timed = [r for r in delayed if r["eta"] and r["prerun"]]
    latest = sorted(timed, key=lambda r: r["at"] - r["eta"])[-max(1, len(timed) // 100):]
    if not timed:
        return "n/a"
    pool, gate, body = (mean([(r[b] - r[a]) * 1000 for r in latest]) for a, b in
                        (("eta", "prerun"), ("prerun", "admitted"), ("admitted", "at")))
    return f"{pool:.1f} / {gate:.1f} / {body:.1f}"
