"""What `bench.gate` times: the references (a trivial EVALSHA, `limits`' moving window) and
the gate's rows (sync admit-heavy, delay-heavy, over a 100k log, in a
pool with a concurrency cap; AsyncGate with 50 in flight), each over its own tool and keys.
"""

from __future__ import annotations

import asyncio
import math
import sys
import uuid
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from bench.interleaved import Contender, run_interleaved, timed_async, timed_sync
from throttle import AsyncGate, Gate, load_config
from throttle.keys import tool_keys

IN_FLIGHT = 50
PREFILL = 100_000
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


def _server_now_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


def delete_prefix(client: redis.Redis, prefix: str) -> int:
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
                lambda members: timed_sync(call_trivial, members),
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
                lambda members: timed_sync(call_limits, members),
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
                lambda members: self.runner.run(timed_async(call_async_gate, members, IN_FLIGHT)),
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
                    timed_async(call_async_trivial, members, IN_FLIGHT)
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

        return Contender(key, label, lambda members: timed_sync(call, members), reset)

    def _reset_prefilled(self) -> None:
        log_key, *others = tool_keys(self.prefix, "prefilled").as_list()
        self.admin.delete(log_key, *others)
        _prefill(self.admin, log_key, PREFILL)

    def run(self, progress: Callable[[str], None]) -> None:
        """Warm every contender up, then time `rounds` interleaved runs of `n` calls each."""
        run_interleaved(self.contenders, self.n, self.rounds, progress)

    def close(self) -> None:
        """Close every client and delete every key under the bench prefix."""
        for closer in self._closers:
            try:
                closer()
            except Exception as exc:  # cleanup must go on: report and continue
                print(f"bench: closing a client failed: {exc!r}", file=sys.stderr)
        self.runner.close()
        delete_prefix(self.admin, self.prefix)
        self.admin.close()
