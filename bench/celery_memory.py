"""Part 3 of `bench.celery`: what a held call costs, in the worker's memory and in Redis.

10,000 calls at 10/1s (max_delay 50m) on one node, which ends up holding most of them as
ETA tasks: its main process's RSS against its idle RSS, and the gate's and the broker's
Redis bytes per held call.
"""

from __future__ import annotations

import time

from bench.celery_setup import Bench
from bench.measures import Figure, rss_bytes, wait_until


def memory(bench: Bench, n: int) -> list[Figure]:
    node = bench.nodes["T0"]
    time.sleep(1)
    idle = rss_bytes(node.pid)
    held_keys = [f"{bench.prefix}:{{hold}}:{kind}" for kind in ("log", "adm")]
    start = time.monotonic()
    for _ in range(n):
        bench.tasks["hold"].apply_async(ignore_result=True)
    enqueue_s = time.monotonic() - start
    scheduled = reserved = 0

    def all_held() -> bool:
        nonlocal scheduled, reserved
        if bench.queue_length("tool.hold") > 0:
            return False
        reserved = int(bench.gate.zcard(held_keys[1]))
        replies = bench.app.control.inspect(timeout=5).scheduled() or {}
        scheduled = sum(len(v) for k, v in replies.items() if k.startswith("T0@"))
        return scheduled >= reserved - 2 and reserved > 0

    held_ok = wait_until(all_held, 240, 1.0)
    took_s = time.monotonic() - start
    rss = rss_bytes(node.pid)
    pool_rss = [rss_bytes(child) for child in node.children]
    gate_bytes = sum(int(bench.gate.memory_usage(key) or 0) for key in held_keys)
    broker_bytes = sum(
        int(bench.broker.memory_usage(k) or 0) for k in ("unacked", "unacked_index")
    )
    per_call = (rss - idle) / max(1, scheduled)
    part = "3 memory 10/1s, 1 node"
    return [
        Figure(
            part,
            f"calls held as ETA tasks, of {n} ({took_s:.0f}s; enqueue {enqueue_s:.0f}s)",
            f"{scheduled}",
            f">= reserved ({reserved})",
            held_ok and scheduled >= reserved - 2,
        ),
        Figure(
            part,
            "worker main RSS idle -> holding, MiB",
            f"{idle / 2**20:.1f} -> {rss / 2**20:.1f}",
            raw={"idle": idle, "held": rss},
        ),
        Figure(part, "RSS per held call, KiB", f"{per_call / 1024:.2f}"),
        Figure(
            part,
            "pool processes RSS at start -> now, MiB",
            ", ".join(
                f"{a / 2**20:.0f} -> {b / 2**20:.0f}"
                for a, b in zip(bench.pool_rss_at_start, pool_rss, strict=False)
            ),
            raw={"start": bench.pool_rss_at_start, "now": pool_rss},
        ),
        Figure(
            part,
            "Redis: gate log + adm, B per held call",
            f"{gate_bytes / max(1, scheduled):.0f}",
        ),
        Figure(
            part,
            "Redis: broker unacked messages, B per call",
            f"{broker_bytes / max(1, scheduled):.0f}",
        ),
    ]
