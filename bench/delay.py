"""What `.delay()` costs the caller (a web request): a throttle tool against a plain Celery task.

No worker runs: both tasks only publish. On the throttle app of `bench.apps` (Redis broker,
gate on the same server), `tool noop .delay(run="")` and `plain.noop.delay(run="")` are timed
call by call, in alternating slices of 100 (the order rotating from round to round), over
`--rounds` rounds of `--n` calls each. Each round gives both p50s and their ratio; the figure
is the median of the rounds' ratios, with their range as the spread. The throttle call's own
parts are timed alone in the same run: the schema check (`check_arguments`) and the
registration round trip (`Gate.register_call`). Queues and gate keys made here are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from bench.apps import build
from throttle.store import mask_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
TARGET_P50_RATIO = 1.15
SLICE = 100
CONFIG = {"broker": {"visibility_timeout": "1h"},
          "tools": {"noop": {"limits": ["1000000/1s"], "max_delay": "60s"}}}


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def timed_us(call: Callable[[], Any], count: int) -> list[float]:
    """Microseconds of each of `count` calls."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def measure(url: str, dbs: tuple[int, int], n: int, rounds: int) -> dict[str, Any]:
    """Run the rounds; return every figure."""
    broker_url, gate_url = with_db(url, dbs[0]), with_db(url, dbs[1])
    prefix = f"bench-delay-{uuid.uuid4().hex[:8]}"
    env = {"BENCH_REDIS_URL": gate_url, "BENCH_BROKER_URL": broker_url,
           "BENCH_RESULT_BACKEND": gate_url, "BENCH_PREFIX": prefix,
           "BENCH_CONFIG": json.dumps(CONFIG)}
    app, throttle, tasks = build(env)
    assert throttle is not None
    tool, plain = tasks["noop"], tasks["plain.noop"]
    contenders: dict[str, Callable[[], Any]] = {
        "throttle": lambda: tool.delay(run=""),
        "plain": lambda: plain.delay(run=""),
    }
    check_at = time.time() + 60
    parts: dict[str, Callable[[], Any]] = {
        "schema check": lambda: tool.check_arguments((), {"run": ""}),
        "registration": lambda: throttle.gate.register_call(
            "noop", uuid.uuid4().hex, "{}", check_at),
    }
    broker = redis.Redis.from_url(broker_url)
    gate = redis.Redis.from_url(gate_url)
    try:
        for call in (*contenders.values(), *parts.values()):  # warm-up: connections, caches
            timed_us(call, 50)
        per_round: list[dict[str, list[float]]] = []
        for round_no in range(rounds):
            samples: dict[str, list[float]] = {name: [] for name in (*contenders, *parts)}
            order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
            for _ in range(0, n, SLICE):
                for name in order:
                    samples[name] += timed_us(contenders[name], SLICE)
                for name, call in parts.items():
                    samples[name] += timed_us(call, SLICE // 10)
            per_round.append(samples)
    finally:
        queues = ("tool.noop", "plain.noop")
        for queue in queues:
            for key in broker.scan_iter(match=f"{queue}*"):
                broker.delete(key)
        # kombu's exchange bindings: a set per exchange, '<key>\x06\x16<pattern>\x06\x16<queue>'
        for key in broker.scan_iter(match="_kombu.binding*"):
            ours = [m for m in broker.smembers(key) if m.split(b"\x06\x16")[-1].decode() in queues]
            if ours:
                broker.srem(key, *ours)
        for key in gate.scan_iter(match=f"{prefix}:*", count=1000):
            gate.delete(key)
        app.close()
    ratios = [statistics.median(r["throttle"]) / statistics.median(r["plain"]) for r in per_round]
    p50 = {name: statistics.median(v for r in per_round for v in r[name])
           for name in per_round[0]}
    ratio = statistics.median(ratios)
    return {"n": n, "rounds": rounds, "redis_url": mask_url(url), "p50_us": p50,
            "round_ratios": ratios, "ratio": ratio, "target": TARGET_P50_RATIO,
            "pass": ratio <= TARGET_P50_RATIO}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="calls per contender and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dbs", type=int, nargs=2, default=(3, 5), metavar=("BROKER", "GATE"),
                        help="database numbers of the broker and the gate (default 3 5)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.n < SLICE or args.rounds < 1:
        parser.error(f"--n must be at least {SLICE} and --rounds at least 1")
    url = os.environ.get("THROTTLE_REDIS_URL") or DEFAULT_URL
    result = measure(url, tuple(args.dbs), args.n, args.rounds)
    p50 = result["p50_us"]
    print(f".delay() in the caller, {args.rounds} rounds x {args.n} calls each, "
          f"{result['redis_url']} (broker db {args.dbs[0]}, gate db {args.dbs[1]}):")
    for name, value in p50.items():
        print(f"  {name:<14} p50 {value:8.1f} µs")
    ratios = result["round_ratios"]
    verdict = "PASS" if result["pass"] else "MISS"
    print(f"  throttle / plain p50: {result['ratio']:.2f}x (rounds {min(ratios):.2f}-"
          f"{max(ratios):.2f}; <= {TARGET_P50_RATIO:.2f}x) {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 1 if args.check and not result["pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
