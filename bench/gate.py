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
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from rich.console import Console
from rich.table import Table

from throttle import AsyncGate, Decision, Gate, load_config
from throttle.keys import tool_keys
from throttle.store import mask_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_N = 20_000
DEFAULT_ROUNDS = 3
SLICE = 1_000
IN_FLIGHT = 50
PREFILL = 100_000
WARMUP_MAX = 2_000
TRIVIAL_LUA = "return 1"

ADMIT_LIMIT = "10000000/10m"  # never binds; the 100k prefill stays in the window
DELAY_WINDOW = "1s"
DELAY_MAX_DELAY = "59m"
DELAY_MAX_DELAY_S = 59 * 60
LIMITS_LIMIT = "1000000/minute"
POOL_LIMIT = "10000000/10m"  # never binds, not even for the class's share of it
POOL_SHARES = {"critical": 1.0, "standard": 0.5}
POOLED_CONCURRENCY = 100_000  # above the calls one client makes in a lease's 1 s
POOLED_LEASE = "1s"

TARGET_VS_LIMITS = 1.0
TARGET_VS_EVALSHA = 0.85
TARGET_ROWS = ("gate_admit", "gate_delay")
# This row against that one, at least this ratio (each measured in the same run).
TARGETS_RELATIVE = (
    ("gate_pooled", "gate_admit", 0.8),  # a pool and a concurrency cap cost little
    ("async_gate_admit", "gate_admit", 3.0),  # 50 in flight share round trips
)

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


def _timed_sync(call: Call, members: Sequence[str]) -> tuple[float, list[Any]]:
    gc.collect()
    start = time.perf_counter()
    out = [call(member) for member in members]
    return time.perf_counter() - start, out


async def _timed_async(
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


def _action(result: Any) -> str:
    if isinstance(result, Decision):
        return result.action.value
    if result is True:
        return "admit"
    if result is False:
        return "reject"
    return "ok"


def _server_now_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


def _delete_prefix(client: redis.Redis, prefix: str) -> int:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    return int(client.delete(*keys)) if keys else 0


def _prefill(client: redis.Redis, log_key: str, count: int) -> None:
    """`count` admitted entries spread over the last second (inside any window of 1 s or more)."""
    now = _server_now_ms(client)
    step = 1000 / count
    pipe = client.pipeline(transaction=False)
    chunk = 10_000
    for first in range(0, count, chunk):
        mapping = {
            f"pre-{i:07d}": now - 1000 + i * step for i in range(first, min(count, first + chunk))
        }
        pipe.zadd(log_key, mapping)
    pipe.pexpire(log_key, 600_000)
    pipe.execute()


def delay_limit(n: int) -> str:
    """A limit that delays all but its first `max` calls and whose log holds `n` reservations."""
    window_s = 1
    per_max = 1 + DELAY_MAX_DELAY_S / window_s
    top = max(10, math.ceil(n * 1.05 / per_max))
    return f"{top}/{DELAY_WINDOW}"


class Bench:
    """Builds the contenders over one Redis, runs them interleaved, cleans up."""

    def __init__(self, url: str, n: int, rounds: int) -> None:
        self.url = url
        self.n = n
        self.rounds = rounds
        self.prefix = f"bench-{uuid.uuid4().hex[:12]}"
        self.admin = redis.Redis.from_url(url)
        self.runner = asyncio.Runner()
        self.config = load_config(
            {
                "broker": {"visibility_timeout": "2h"},
                "pools": {"bench_pool": {"limits": [POOL_LIMIT], "shares": POOL_SHARES}},
                "tools": {
                    "admit_heavy": {"limits": [ADMIT_LIMIT], "max_delay": "10m"},
                    "delay_heavy": {"limits": [delay_limit(n)], "max_delay": DELAY_MAX_DELAY},
                    "prefilled": {"limits": [ADMIT_LIMIT], "max_delay": "10m"},
                    "async_admit": {"limits": [ADMIT_LIMIT], "max_delay": "10m"},
                    "pooled": {
                        "limits": [ADMIT_LIMIT], "max_delay": "10m", "pool": "bench_pool",
                        "priority": "standard", "concurrency": POOLED_CONCURRENCY,
                        "lease_timeout": POOLED_LEASE,
                    },
                },
            }
        )
        self._closers: list[Callable[[], None]] = []
        self.contenders = self._build()

    def _reset_tool(self, tool: str) -> Callable[[], None]:
        config = self.config.tool(tool)
        keys = tool_keys(
            self.prefix, tool, pool=config.pool, concurrency=config.concurrency is not None
        ).as_list()

        def reset() -> None:
            self.admin.delete(*keys)

        return reset

    def _build(self) -> list[Contender]:
        url, prefix = self.url, self.prefix
        contenders: list[Contender] = []

        # 1. The floor: bare redis-py EVALSHA of `return 1`, one key, one arg.
        plain = redis.Redis.from_url(url)
        self._closers.append(plain.close)
        trivial = plain.register_script(TRIVIAL_LUA)
        trivial_key = [f"{prefix}:trivial"]

        def call_trivial(member: str) -> Any:
            return trivial(keys=trivial_key, args=[member])

        contenders.append(
            Contender(
                "evalsha",
                "trivial EVALSHA (redis-py)",
                lambda members: _timed_sync(call_trivial, members),
                lambda: None,
            )
        )

        # 2. limits' moving window on a limit that never binds.
        storage = RedisStorage(url, key_prefix=f"{prefix}-limits")
        limiter = MovingWindowRateLimiter(storage)
        limits_client: Any = storage.get_connection()
        self._closers.append(limits_client.close)
        item = parse(LIMITS_LIMIT)
        identity = uuid.uuid4().hex

        def call_limits(member: str) -> Any:
            return limiter.hit(item, "bench", identity)

        contenders.append(
            Contender(
                "limits",
                "limits moving window",
                lambda members: _timed_sync(call_limits, members),
                lambda: storage.clear(item.key_for("bench", identity)),
            )
        )

        # 3, 4, 6, 7. The sync Gate: admit-heavy, delay-heavy, admit-heavy over a 100k log,
        # and admit-heavy in a pool with a concurrency cap.
        gate = Gate(url, self.config, prefix=prefix)
        self._closers.append(gate.close)
        for key, label, tool in (
            ("gate_admit", "Gate admit-heavy", "admit_heavy"),
            ("gate_delay", "Gate delay-heavy", "delay_heavy"),
            ("gate_pooled", "Gate tool + pool + concurrency", "pooled"),
        ):
            contenders.append(self._gate_contender(gate, key, label, tool, self._reset_tool(tool)))
        contenders.append(
            self._gate_contender(
                gate,
                "gate_prefilled",
                f"Gate admit-heavy, {PREFILL // 1000}k log",
                "prefilled",
                self._reset_prefilled,
            )
        )

        # 5. AsyncGate, 50 in flight, and its reference: the trivial script, 50 in flight.
        async_gate = AsyncGate(url, self.config, prefix=prefix)
        self._closers.append(lambda: self.runner.run(async_gate.aclose()))

        async def call_async_gate(member: str) -> Any:
            return await async_gate.acquire("async_admit", member)

        contenders.append(
            Contender(
                "async_gate_admit",
                f"AsyncGate admit-heavy, {IN_FLIGHT}",
                lambda members: self.runner.run(_timed_async(call_async_gate, members, IN_FLIGHT)),
                self._reset_tool("async_admit"),
            )
        )
        async_plain = redis.asyncio.Redis.from_url(url)
        self._closers.append(lambda: self.runner.run(async_plain.aclose()))
        async_trivial = async_plain.register_script(TRIVIAL_LUA)

        async def call_async_trivial(member: str) -> Any:
            return await async_trivial(keys=trivial_key, args=[member])

        contenders.append(
            Contender(
                "async_evalsha",
                f"async trivial EVALSHA, {IN_FLIGHT}",
                lambda members: self.runner.run(
                    _timed_async(call_async_trivial, members, IN_FLIGHT)
                ),
                lambda: None,
            )
        )
        return contenders

    @staticmethod
    def _gate_contender(
        gate: Gate, key: str, label: str, tool: str, reset: Callable[[], None]
    ) -> Contender:
        def call(member: str) -> Any:
            return gate.acquire(tool, member)

        return Contender(key, label, lambda members: _timed_sync(call, members), reset)

    def _reset_prefilled(self) -> None:
        log_key, *others = tool_keys(self.prefix, "prefilled").as_list()
        self.admin.delete(log_key, *others)
        _prefill(self.admin, log_key, PREFILL)

    def _members(self, count: int) -> list[str]:
        return [uuid.uuid4().hex for _ in range(count)]

    def run(self, progress: Callable[[str], None]) -> None:
        """Warm every contender up, then time `rounds` runs of `n` calls of each.

        A run is cut into slices of SLICE calls, and the slices of all contenders alternate
        (in an order that rotates from slice to slice), so that a burst of load on the machine
        lands on every contender alike instead of on whichever ran at the time.
        """
        warmup = self._members(min(self.n, WARMUP_MAX))
        for contender in self.contenders:
            progress(f"warm-up: {contender.label}")
            contender.reset()
            contender.run(warmup)
        slices = range(0, self.n, SLICE)
        for round_no in range(self.rounds):
            for contender in self.contenders:
                contender.reset()
            spent = dict.fromkeys((c.key for c in self.contenders), 0.0)
            for index, first in enumerate(slices):
                size = min(SLICE, self.n - first)
                progress(
                    f"run {round_no + 1}/{self.rounds}: {first + size:,}/{self.n:,} calls each"
                )
                shift = (index + round_no) % len(self.contenders)
                for contender in self.contenders[shift:] + self.contenders[:shift]:
                    seconds, out = contender.run(self._members(size))
                    spent[contender.key] += seconds
                    contender.actions.update(_action(result) for result in out)
                    contender.calls += len(out)
            for contender in self.contenders:
                contender.seconds.append(spent[contender.key])

    def close(self) -> None:
        """Close every client and delete every key under the bench prefix."""
        for closer in self._closers:
            try:
                closer()
            except Exception as exc:  # cleanup must go on: report and continue
                print(f"bench: closing a client failed: {exc!r}", file=sys.stderr)
        self.runner.close()
        _delete_prefix(self.admin, self.prefix)
        self.admin.close()


def _mix(contender: Contender) -> str:
    """The answers over the timed runs, e.g. "delay 59,970, admit 30"."""
    return ", ".join(f"{action} {count:,}" for action, count in contender.actions.most_common())


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def _round_ratios(row: dict[str, Any], reference: dict[str, Any]) -> str:
    """The rate ratio of `row` over `reference` in each interleaved round: "lo-hi"."""
    ratios = [ref / own for own, ref in zip(row["runs_s"], reference["runs_s"], strict=True)]
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}"


def report(bench: Bench, console: Console) -> dict[str, Any]:
    """Print the table and the targets line; return the numbers for --json."""
    n = bench.n
    by_key = {contender.key: contender for contender in bench.contenders}
    evalsha = by_key["evalsha"].best_rate(n)
    limits_rate = by_key["limits"].best_rate(n)

    table = Table(
        title=f"throttle gate: decisions/s, best of {bench.rounds} interleaved runs of "
        f"{n:,} calls, one client, {mask_url(bench.url)}; ratios are within this run"
    )
    table.add_column("contender")
    table.add_column("decisions/s", justify="right")
    table.add_column("µs/decision", justify="right")
    table.add_column("x EVALSHA", justify="right")
    table.add_column("x limits", justify="right")
    table.add_column("answers")
    table.add_column("spread", justify="right")

    rows: list[dict[str, Any]] = []
    for contender in bench.contenders:
        rate = contender.best_rate(n)
        row: dict[str, Any] = {
            "key": contender.key,
            "contender": contender.label,
            "decisions_per_s": rate,
            "us_per_decision": 1e6 / rate,
            "ratio_vs_evalsha": _ratio(rate, evalsha),
            "ratio_vs_limits": _ratio(rate, limits_rate),
            "runs_s": contender.seconds,
            "spread": contender.spread(),
            "actions": dict(contender.actions),
        }
        rows.append(row)
        table.add_row(
            contender.label,
            f"{rate:,.0f}",
            f"{1e6 / rate:.1f}",
            f"{row['ratio_vs_evalsha']:.2f}x",
            f"{row['ratio_vs_limits']:.2f}x",
            _mix(contender),
            f"{contender.spread():.1%}",
        )
    console.print(table)

    targets: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for key in TARGET_ROWS:
        row = next(r for r in rows if r["key"] == key)
        checks: tuple[tuple[str, float, float], ...] = (
            ("limits", row["ratio_vs_limits"], TARGET_VS_LIMITS),
            ("evalsha", row["ratio_vs_evalsha"], TARGET_VS_EVALSHA),
        )
        for name, value, target in checks:
            ok = value >= target
            targets.append(
                {"contender": key, "versus": name, "ratio": value, "target": target, "pass": ok}
            )
            verdict = "[green]PASS[/green]" if ok else "[red]MISS[/red]"
            ref = "limits' moving window" if name == "limits" else "trivial EVALSHA"
            spread = _round_ratios(row, next(r for r in rows if r["key"] == name))
            verdicts.append(
                f"{row['contender']} {value:.2f}x {ref} ({spread}; >= {target:.2f}x) {verdict}"
            )
    for key, reference_key, target in TARGETS_RELATIVE:
        row = next(r for r in rows if r["key"] == key)
        reference = next(r for r in rows if r["key"] == reference_key)
        value = _ratio(row["decisions_per_s"], reference["decisions_per_s"])
        ok = value >= target
        targets.append(
            {"contender": key, "versus": reference_key, "ratio": value, "target": target,
             "pass": ok}
        )
        verdict = "[green]PASS[/green]" if ok else "[red]MISS[/red]"
        verdicts.append(
            f"{row['contender']} {value:.2f}x {reference['contender']} "
            f"({_round_ratios(row, reference)}; >= {target:.2f}x) {verdict}"
        )
    console.print(
        f"Targets: Gate >= {TARGET_VS_LIMITS:.1f}x limits' moving window and >= "
        f"{TARGET_VS_EVALSHA:.2f}x the trivial EVALSHA, admit-heavy and delay-heavy; a pool "
        "and a concurrency cap keep >= 0.8x of admit-heavy; "
        "AsyncGate with 50 in flight >= 3x the sync admit-heavy:"
    )
    for line in verdicts:
        console.print(f"  {line}")
    return {
        "n": n,
        "rounds": bench.rounds,
        "in_flight": IN_FLIGHT,
        "prefill": PREFILL,
        "redis_url": mask_url(bench.url),
        "delay_limit": delay_limit(n),
        "contenders": rows,
        "targets": targets,
        "all_pass": all(t["pass"] for t in targets),
    }


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
