"""How many decisions per second the throttle gate makes against a real Redis, and at what cost.

What it measures
    One client making one call after another (the two asyncio rows keep 50 in flight), N calls
    per run (`--n`, default 20,000), every contender in the same process against the same Redis
    (`THROTTLE_REDIS_URL`, default redis://127.0.0.1:6379/0):

    trivial EVALSHA (redis-py)   `register_script("return 1")` called with one key and one arg:
                                 the floor that any one-round-trip Lua gate pays over redis-py.
    limits moving window         the `limits` library: `RedisStorage` +
                                 `MovingWindowRateLimiter.hit` on "1000000/minute", a limit
                                 that never binds (its Lua: LINDEX, LPUSH, LTRIM, EXPIRE).
    Gate admit-heavy             `Gate.acquire` on a tool whose limit never binds
                                 ("10000000/10m"), a fresh member (task id) per call: all ADMIT.
    Gate delay-heavy             `Gate.acquire` on a tool limited to 10/1s with max_delay 59m
                                 (visibility_timeout 2h): all but the first 10 calls of a run
                                 reserve a future slot (DELAY). For very large `--n` the limit is
                                 raised so that the bounded log, max x (1 + max_delay / window)
                                 entries, never turns a call into a FALLBACK.
    Gate admit-heavy, 100k log   as admit-heavy, with 100,000 entries already in the window: the
                                 cost of a call must not grow with the log (the script counts
                                 with ZCOUNT when every cost is 1).
    Gate tool + pool + concurrency  as admit-heavy, on a tool that is also in a pool (limit
                                 "10000000/10m", its class's share 0.5) and has a concurrency
                                 cap (100,000, leases of 1 s): none of them binds, so every call
                                 is ADMIT, and pays for the pool's log and its lease. Leases are
                                 not given back (no `finish`); they expire after 1 s, and the cap
                                 is above the calls one client makes in a second.
    AsyncGate admit-heavy, 50    `AsyncGate.acquire`, 50 calls in flight on one event loop.
    async trivial EVALSHA, 50    the trivial script, 50 in flight: the reference for the row above.

    Every contender is warmed up, then timed over 3 runs (`--rounds`) and its best run counts.
    A run is cut into slices of 1,000 calls and the slices of all contenders alternate, in an
    order that rotates from slice to slice, so that load from other processes on the machine
    lands on every contender alike. Keys live under a unique prefix, are reset before each run
    (the 100k log is refilled) and deleted at the end.

How to read it
    Absolute rates depend on the machine and its load; the ratios, measured in the same run,
    much less. "x EVALSHA" is the contender's rate over the bare redis-py round trip (1.00x
    would mean the gate's logic costs nothing); "x limits" compares with a widely used Redis
    rate limiter. "answers" shows what each contender answered, proving it took the path it
    claims to measure. "spread" is (best - worst) / best over the runs: above ~10% the machine
    was busy; rerun before trusting small differences. The targets line checks the two sync
    Gate rows (admit- and delay-heavy) against >= 1.0x limits' moving window and >= 0.85x the
    trivial EVALSHA, the pool + concurrency row against >= 0.8x Gate admit-heavy (the tool
    alone), and AsyncGate with 50 in flight against >= 3x sync Gate admit-heavy (one pipeline per
    event-loop tick). `--json PATH` writes every number; `--check` exits 1 on a missed target.
    What live overrides cost is measured apart, in `bench.overrides`.

Where it lives
    `bench.gate_contenders` builds what is timed, `bench.interleaved` times it, and
    `bench.gate_report` prints the table and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import redis
from rich.console import Console

from bench.gate_contenders import Bench
from bench.gate_report import report
from throttle.store import mask_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_N = 20_000
DEFAULT_ROUNDS = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gate",
        description="Decisions per second of the throttle gate vs a trivial EVALSHA and limits.",
    )
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="calls per run (default 20000)")
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved runs; the best counts"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        parser.error("--n and --rounds must be at least 1")

    url = os.environ.get("THROTTLE_REDIS_URL") or DEFAULT_URL
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        console.print(
            f"[red]cannot reach Redis at {mask_url(url)}: {exc}[/red]; start it "
            "(make services) or set THROTTLE_REDIS_URL"
        )
        return 2

    bench = Bench(url, args.n, args.rounds)
    try:
        with console.status("warming up") as status:
            bench.run(lambda text: status.update(text))
    finally:
        bench.close()
    result = report(bench, console)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        console.print(f"numbers written to {args.json}")
    return 1 if args.check and not result["all_pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
