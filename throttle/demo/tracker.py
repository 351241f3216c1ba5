"""What became of every call the demo sent, seen from outside the workers.

Outcomes come from the result backend (`throttle.outcome`); admission times from the gate's
own log (a ZSET per tool: task id -> admission time in ms, by the Redis clock), read at
least four times per window, as an entry stays in the log for one window. Both work with
an in-process worker and with worker processes on other machines.

A pool's log (task id -> admission time, every tool of the pool) is read the same way. Why
a call waited is not in its result: the tool's reservations are seen in its log, and the
rest of a wait (`Call.unexplained_waits`) is what the pool may have caused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult

from throttle.config import Config, PoolConfig, ToolConfig
from throttle.keys import ToolKeys, keys_for, reserved_in, tool_keys
from throttle.task import outcome

DELAYED_AFTER_S = 0.5


@dataclass
class Call:
    """One call: when it was sent, admitted (gate clock) and answered, and how."""

    tool: str
    key_value: Any
    sent_at: float
    admitted_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None
    slot_at: float | None = None
    reserved_after: float | None = None
    units: float = 1.0
    pool_slot: bool = False  # its reservation was (also) a slot in its pool's log
    session: Any = None  # the call's session_id

    @property
    def wait_s(self) -> float | None:
        """Seconds from sending to admission, for a call that got the tool's answer."""
        if self.outcome != "result":
            return None
        started = self.admitted_at if self.admitted_at is not None else self.finished_at
        return None if started is None else max(0.0, started - self.sent_at)

    @property
    def delayed(self) -> bool:
        """Whether the call waited (admitted over 0.5 s after sending): for a reserved slot,
        or for its pool."""
        wait_s = self.wait_s
        return wait_s is not None and wait_s > DELAYED_AFTER_S

    def unexplained_waits(self) -> list[tuple[float, float]]:
        """The spans (start, end), over 0.5 s each, of a delayed call's wait that its tool's
        reservation does not explain: from sending until it got a slot, and from its slot
        until its admission (or from sending until its admission, if it never held one).

        `slot_at` is the reserved slot seen in the tool's log; `reserved_after`, the poll
        before the one that first saw it (the reservation was made after it). A slot the
        pool gave (its log held the reservation too) does not explain the wait either.
        """
        if not self.delayed or self.admitted_at is None:
            return []
        if self.slot_at is None or self.reserved_after is None or self.pool_slot:
            spans = [(self.sent_at, self.admitted_at)]
        else:
            spans = [(self.sent_at, self.reserved_after), (self.slot_at, self.admitted_at)]
        return [(start, end) for start, end in spans if end - start > DELAYED_AFTER_S]


@dataclass(frozen=True, slots=True)
class GateView:
    """A tool's log at one instant: units admitted in each limit's trailing window (calls,
    or e.g. tokens for a tool with a cost), and reservations. For a tool limited per key, the
    busiest key's figures.
    """

    window_use: tuple[float, ...]
    reserved: int


@dataclass(frozen=True, slots=True)
class PoolAdmission:
    """One entry of a pool's log: when (Redis clock, whole microseconds) and how many units."""

    at_us: int
    units: float


@dataclass
class Tracker:
    """Calls by task id, refreshed from the gate's log (`poll_gate`) and the results."""

    app: Celery
    config: Config
    store: redis.Redis
    prefix: str
    calls: dict[str, Call] = field(default_factory=dict)
    gate: dict[str, GateView] = field(default_factory=dict)
    pools: dict[str, dict[str, PoolAdmission]] = field(default_factory=dict)
    now_s: float = field(default_factory=time.time)
    _pending: set[str] = field(default_factory=set)
    _key_values: dict[str, set[Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self, tool: str, task_id: str, sent_at: float, kwargs: Mapping[str, Any]) -> None:
        """Record a call just enqueued (thread-safe)."""
        key_arg = self.config.tool(tool).key
        key_value = kwargs.get(key_arg) if key_arg else None
        with self._lock:
            self.calls[task_id] = Call(tool, key_value, sent_at,
                                       session=kwargs.get("session_id"))
            self._pending.add(task_id)
            if key_arg:
                self._key_values.setdefault(tool, set()).add(key_value)

    @property
    def unanswered(self) -> int:
        """Calls sent and not answered yet."""
        with self._lock:
            return len(self._pending)

    def calls_of(self, tool: str) -> list[Call]:
        """A snapshot of the calls of `tool`."""
        with self._lock:
            return [call for call in self.calls.values() if call.tool == tool]

    def poll_results(self) -> None:
        """Read the outcome of every call that was pending and is answered now."""
        with self._lock:
            pending = list(self._pending)
        if not pending:
            return
        for task_id, meta in self.app.backend.get_many(pending, interval=0, max_iterations=1):
            call = self.calls[task_id]
            call.outcome = outcome(AsyncResult(task_id, app=self.app))
            call.finished_at = _timestamp(meta.get("date_done")) or time.time()
            with self._lock:
                self._pending.discard(task_id)

    def poll_gate(self) -> None:
        """Read the gate's logs: admission times, window use, reservations, pool admissions.

        One transaction, so that a log and its admissions are read at the same instant.
        """
        with self._lock:
            targets = [
                (tool, value)
                for tool in self.config.tools.values()
                for value in (sorted(self._key_values.get(tool.name, ()), key=str)
                              if tool.key else [None])
            ]
        pools = [(pool, pool_keys(self.prefix, self.config, pool)) for pool in self.used_pools()]
        pipe = self.store.pipeline(transaction=True)
        pipe.time()
        for tool, value in targets:
            keys = self.keys_of(tool, value)
            pipe.zrange(keys.log, 0, -1, withscores=True)
            pipe.zrange(keys.adm, 0, -1)
            pipe.hgetall(keys.cost)
        for _, (pool_log, pool_cost) in pools:
            pipe.zrange(pool_log, 0, -1, withscores=True)
            pipe.hgetall(pool_cost)
        answers = pipe.execute()
        seconds, micros = answers[0]
        now_ms = int(seconds) * 1000 + int(micros) / 1000
        views: dict[str, list[GateView]] = {}
        reserved_anywhere: set[bytes] = set()
        for index, (tool, _) in enumerate(targets):
            log, admitted, costs = answers[1 + 3 * index : 4 + 3 * index]
            reserved = set(reserved_in(log, admitted))
            reserved_anywhere |= reserved
            self._note_admissions(log, reserved, costs, now_ms)
            views.setdefault(tool.name, []).append(_view(tool, log, reserved, costs, now_ms))
        first = 1 + 3 * len(targets)
        for index, (pool, _) in enumerate(pools):
            log, costs = answers[first + 2 * index], answers[first + 2 * index + 1]
            self._note_pool(pool.name, log, costs, reserved_anywhere)
        self.gate = {name: _busiest(found) for name, found in views.items()}
        self.now_s = now_ms / 1000

    def keys_of(self, tool: ToolConfig, value: Any) -> ToolKeys:
        """The gate's keys of `tool` (and key value), where the gate keeps them."""
        return keys_for(self.prefix, tool, value)

    def used_pools(self) -> list[PoolConfig]:
        """The pools that at least one tool of the config is in."""
        names = {tool.pool for tool in self.config.tools.values() if tool.pool}
        return [pool for name, pool in self.config.pools.items() if name in names]

    def pool_use(self, pool: PoolConfig) -> tuple[float, ...]:
        """Units of `pool` admitted in the trailing window of each of its limits, now."""
        now_us = round(self.now_s * 1_000_000)
        entries = list(self.pools.get(pool.name, {}).values())
        return tuple(
            sum(entry.units for entry in entries
                if now_us - limit.window_ms * 1000 < entry.at_us <= now_us)
            for limit in pool.limits
        )

    def _note_admissions(
        self, log: list[tuple[bytes, float]], reserved: set[bytes],
        costs: Mapping[bytes, bytes], now_ms: float,
    ) -> None:
        for member, score in log:
            call = self.calls.get(member.decode())
            if call is None:
                continue
            call.units = float(costs.get(member, b"1"))  # settled once the body returned
            if member in reserved:
                if call.reserved_after is None:
                    call.reserved_after = self.now_s
                call.slot_at = score / 1000
            elif score <= now_ms and call.admitted_at is None:
                call.admitted_at = score / 1000

    def _note_pool(
        self, pool: str, log: list[tuple[bytes, float]], costs: Mapping[bytes, bytes],
        reserved: set[bytes],
    ) -> None:
        """Note the pool's admissions; an entry whose call holds a reservation in its tool's
        log is the slot the pool gave it (pool waits), not an admission."""
        seen = self.pools.setdefault(pool, {})
        for member, score in log:
            name = member.decode()
            if member in reserved:
                seen.pop(name, None)
                if name in self.calls:
                    self.calls[name].pool_slot = True
                continue
            units = float(costs.get(member, b"1"))
            seen[name] = PoolAdmission(round(score * 1000), units)
            call = self.calls.get(name)
            if call is not None and call.admitted_at is None:
                call.admitted_at = score / 1000


def pool_keys(prefix: str, config: Config, pool: PoolConfig) -> tuple[str, str]:
    """The log and cost keys of `pool` (every tool of the pool shares them)."""
    member = next(tool for tool in config.tools.values() if tool.pool == pool.name)
    keys = tool_keys(prefix, member.name, pool=pool.name)
    if keys.pool_log is None or keys.pool_cost is None:
        raise ValueError(f"tool {member.name!r} has no pool keys")
    return keys.pool_log, keys.pool_cost


def _view(
    tool: ToolConfig, log: list[tuple[bytes, float]], reserved: set[bytes],
    costs: Mapping[bytes, bytes], now_ms: float,
) -> GateView:
    use = tuple(
        sum(float(costs.get(member, b"1")) for member, score in log
            if member not in reserved and now_ms - limit.window_ms < score <= now_ms)
        for limit in tool.limits
    )
    return GateView(use, len(reserved))


def _busiest(views: list[GateView]) -> GateView:
    return max(views, key=lambda view: (max(view.window_use, default=0), view.reserved))


def _timestamp(value: Any) -> float | None:
    """Epoch seconds of a result's `date_done` (an ISO string or a datetime)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
