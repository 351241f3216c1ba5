"""One reading of every tool's state, for `throttle status`, `throttle top` and the exporter.

It takes a few round trips, whatever the number of tools: Redis TIME; one pipeline for the
counters, cooldowns and reservations of every tool and pool; one for their windows; one
more, only for logs holding weighted calls, for their members' costs. Queue depths come
from the broker.

Tools with per-key limits keep one log per key value: their window use and reservations
would need a scan of the keyspace, so they are left out (None); their counters, queue
depth and pool are read as for any tool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from throttle.adaptive import AdaptiveState, read_states
from throttle.config import Config, PoolConfig, ToolConfig
from throttle.fairness import fairness_of
from throttle.keys import (
    ToolKeys,
    cooldown_left_s,
    keys_for,
    limits_key,
    stats_key,
    waiting_key,
)
from throttle.limit import Limit
from throttle.monitor.queues import QueueDepths
from throttle.monitor.stats import (
    RECENT_BUCKET_S,
    RECENT_BUCKETS,
    ToolTotals,
    parse_totals,
    recent_keys,
    sum_recent,
)
from throttle.monitor.tenants import TenantUse, bucket_keys, tenant_uses
from throttle.monitor.waiting import DELAY_REASONS, GRACE_S
from throttle.overrides import Override, in_force, read_overrides
from throttle.quotas import QuotaUse, read_pool_quotas, read_quotas
from throttle.store import StoreClient

logger = logging.getLogger("throttle.monitor.snapshot")


@dataclass(frozen=True, slots=True)
class WindowUse:
    """Units admitted in a limit's trailing window, now."""

    limit: Limit
    used: float

    @property
    def fraction(self) -> float:
        return self.used / self.limit.max


@dataclass(frozen=True, slots=True)
class ToolView:
    """What one tool looks like now; None where it cannot be read cheaply."""

    tool: ToolConfig
    windows: tuple[WindowUse, ...] | None
    reserved: int | None
    queue_depth: int | None
    cooldown_s: float | None
    last_minute: Mapping[str, float]
    totals: ToolTotals
    waiting: Mapping[str, int] = field(default_factory=dict)
    enforced_limits: str | None = None  # what the tool's workers last enforced, if known
    live: Override | None = None  # the override `throttle limits set` put on the tool
    quotas: tuple[QuotaUse, ...] = ()  # today's use of its daily quotas (tools without key)
    fair_by: str | None = None  # the argument it is shared by (its own or its pool's)
    tenants: tuple[TenantUse, ...] = ()  # fair tools: the top tenants of the last minute

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The sliding limits the gate enforces now: the live override's, else the file's."""
        return in_force(self.live.limits if self.live else None, self.tool.limits, ())[0]

    @property
    def waiting_calls(self) -> int:
        """Calls held in workers with an ETA, whatever the reason."""
        return sum(self.waiting.values())

    @property
    def shortest(self) -> WindowUse | None:
        """The use of the tool's shortest window (what `tool_requests_in_window` reports)."""
        if not self.windows:
            return None
        return min(self.windows, key=lambda use: use.limit.window_ms)


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool's use in each of its windows, and each class's use of its allowance."""

    pool: PoolConfig
    windows: tuple[WindowUse, ...]
    cooldown_s: float
    quotas: tuple[QuotaUse, ...] = ()  # today's use of the pool's daily quotas (all tools)

    def class_use(self, priority: str) -> float:
        """The pool's use over the class's allowance (share x max), in its tightest window;
        a class admits only while this stays at or under 1."""
        share = self.pool.shares[priority]
        return max(use.used / (share * use.limit.max) for use in self.windows)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every tool and pool at Redis time `at_s`."""

    at_s: float
    tools: tuple[ToolView, ...]
    pools: Mapping[str, PoolView] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()  # every live override (throttle/overrides.py)
    adaptive: tuple[AdaptiveState, ...] = ()  # every adaptive limit (throttle/adaptive.py)

    def pool_use(self, view: ToolView) -> float | None:
        """The use of the tool's class allowance in its pool, or None without a pool."""
        tool = view.tool
        if not tool.pool or not tool.priority or tool.pool not in self.pools:
            return None
        return self.pools[tool.pool].class_use(tool.priority)

    def effective_rate(self, view: ToolView) -> float:
        """The tool's tightest limit as a rate (per second), lowered to its class's allowance
        (share x max) in its pool; the allowance is shared by every tool of the class."""
        rate = min(limit.max * 1000 / limit.window_ms for limit in view.limits)
        pool = self.pools.get(view.tool.pool or "")
        if pool is not None and view.tool.priority in pool.pool.shares:
            share = pool.pool.shares[view.tool.priority]
            rate = min(rate, *(share * use.limit.max * 1000 / use.limit.window_ms
                               for use in pool.windows))
        return rate


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _keys(prefix: str, tool: ToolConfig) -> ToolKeys:
    # A per-key tool's key value is not known here; its pool keys do not depend on it.
    return keys_for(prefix, tool)


def _range(now_ms: float, limit: Limit) -> tuple[str, float]:
    return f"({now_ms - limit.window_ms}", now_ms  # half-open: (now - window, now]


@dataclass(frozen=True, slots=True)
class _Window:
    """A window to measure: a log, its cost hash, and its admissions set (tool logs only)."""

    limit: Limit
    log: str
    cost: str
    adm: str | None = None


def _window_units(client: StoreClient, now_ms: float, windows: list[_Window]) -> list[float]:
    """Units admitted in each window now: counts, then costs where a log holds weighted calls.

    A tool's log may also hold reservations: then its adm set names the admissions in it.
    """
    pipe = client.pipeline(transaction=False)
    for window in windows:
        low, high = _range(now_ms, window.limit)
        pipe.hlen(window.cost)
        pipe.zcount(window.log, low, high)
        if window.adm:
            pipe.zcount(window.adm, low, high)
            pipe.exists(window.adm)
    counts = iter(pipe.execute())
    units: list[float] = []
    weighted: list[int] = []
    admitted: list[str] = []  # where each window's admissions are named
    for window in windows:
        if int(next(counts)) > 0:
            weighted.append(len(units))
        logged = int(next(counts))
        named = int(next(counts)) if window.adm else 0
        marked = bool(window.adm and int(next(counts)))
        units.append(float(named if marked else logged))
        admitted.append(str(window.adm) if marked else window.log)
    if not weighted:
        return units
    pipe = client.pipeline(transaction=False)
    for index in weighted:
        low, high = _range(now_ms, windows[index].limit)
        pipe.zrangebyscore(admitted[index], low, high)
        pipe.hgetall(windows[index].cost)
    raw = iter(pipe.execute())
    for index in weighted:
        members, costs = next(raw), next(raw)
        units[index] = sum(float(costs.get(m, 1)) for m in members)
    return units


def read_snapshot(
    client: StoreClient, config: Config, prefix: str, queues: QueueDepths | None = None
) -> Snapshot:
    """Read every tool and pool of `config` under `prefix` (raises redis.RedisError)."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros / 1000
    overrides = read_overrides(client, prefix)
    live = {(o.pool, o.tool): o for o in overrides if o.key is None}

    def in_force_of(tool: str | None, pool: str | None, sliding: tuple[Limit, ...],
                    quotas: tuple[Limit, ...]) -> tuple[tuple[Limit, ...], tuple[Limit, ...]]:
        found = live.get((pool, tool))
        return in_force(found.limits if found else None, sliding, quotas)

    def limits_of(tool: str | None, pool: str | None, default: tuple[Limit, ...]
                  ) -> tuple[Limit, ...]:
        return in_force_of(tool, pool, default, ())[0]

    tools = list(config.tools.values())
    pools: dict[str, tuple[PoolConfig, ToolKeys]] = {}
    for tool in tools:
        if tool.pool and tool.pool in config.pools:
            pools.setdefault(tool.pool, (config.pools[tool.pool], _keys(prefix, tool)))

    pipe = client.pipeline(transaction=False)
    for tool in tools:
        keys = _keys(prefix, tool)
        pipe.hgetall(stats_key(prefix, tool.name))
        for name in recent_keys(prefix, tool.name, now_ms / 1000):
            pipe.hgetall(name)
        pipe.pttl(keys.cooldown)
        # Reserved: the log's entries not named in adm (which holds '' at +inf), if it exists.
        pipe.zcount(keys.log, now_ms - tool.longest_window_ms, "+inf")
        pipe.zcount(keys.adm, now_ms - tool.longest_window_ms, "+inf")
        pipe.get(limits_key(prefix, tool.name))
        for reason in DELAY_REASONS:
            pipe.zcount(waiting_key(prefix, tool.name, reason), now_ms - GRACE_S * 1000, "+inf")
    for _, keys in pools.values():
        pipe.pttl(keys.cooldown)
    raw: Iterator[Any] = iter(pipe.execute())

    windows = [_Window(limit, keys.log, keys.cost, keys.adm)
               for tool in tools if tool.key is None
               for keys in [_keys(prefix, tool)]
               for limit in limits_of(tool.name, None, tool.limits)]
    windows += [_Window(limit, str(keys.pool_log), str(keys.pool_cost))
                for pool, keys in pools.values()
                for limit in limits_of(None, pool.name, pool.limits)]
    units = iter(_window_units(client, now_ms, windows))

    depths: Mapping[str, int | None] = {}
    if queues is not None:
        try:
            depths = queues.depths([tool.queue for tool in tools])
        except Exception as exc:  # a broker that does not answer must not hide the rest
            logger.warning("queue depths unavailable from %r: %s", queues, exc)
    views = []
    for tool in tools:
        totals = parse_totals(next(raw))
        recent = sum_recent([next(raw) for _ in range(RECENT_BUCKETS)])
        cooldown_s = cooldown_left_s(next(raw))
        logged, named = int(next(raw)), int(next(raw))
        reserved = logged - named + 1 if named else 0
        enforced = next(raw)
        waiting = {reason: int(next(raw)) for reason in DELAY_REASONS}
        per_key = tool.key is not None
        views.append(ToolView(
            tool=tool,
            windows=None if per_key else tuple(
                WindowUse(lim, next(units)) for lim in limits_of(tool.name, None, tool.limits)),
            reserved=None if per_key else reserved,
            queue_depth=depths.get(tool.queue),
            # A per-key tool outside a pool has a cooldown per key value: not read here.
            cooldown_s=None if per_key and not tool.pool else cooldown_s,
            last_minute=recent,
            totals=totals,
            waiting=waiting,
            enforced_limits=None if enforced is None else _text(enforced),
            live=live.get((None, tool.name)),
            quotas=() if per_key else tuple(read_quotas(
                client, tool, _keys(prefix, tool), now_ms / 1000,
                in_force_of(tool.name, None, tool.limits, tool.quotas)[1])),
        ))
    pool_views = {
        name: PoolView(pool, cooldown_s=cooldown_left_s(next(raw)),
                       windows=tuple(WindowUse(lim, next(units))
                                     for lim in limits_of(None, name, pool.limits)),
                       quotas=tuple(read_pool_quotas(
                           client, prefix, pool, now_ms / 1000,
                           in_force_of(None, name, pool.limits, pool.quotas)[1])))
        for name, (pool, _) in pools.items()
    }
    views = _with_tenants(client, config, prefix, views, now_ms / 1000)
    return Snapshot(at_s=now_ms / 1000, tools=tuple(views), pools=pool_views,
                    overrides=tuple(overrides),
                    adaptive=tuple(read_states(client, config, prefix, now_s=now_ms / 1000)))


def _with_tenants(client: StoreClient, config: Config, prefix: str, views: list[ToolView],
                  now_s: float) -> list[ToolView]:
    """The fair tools' views with their top tenants of the last minute (one pipeline)."""
    fair = {view.tool.name: fair for view in views
            if (fair := fairness_of(config, view.tool)) is not None}
    if not fair:
        return views
    pipe = client.pipeline(transaction=False)
    for name in fair:
        for key in bucket_keys(prefix, name, now_s, RECENT_BUCKET_S, RECENT_BUCKETS):
            pipe.hgetall(key)
    raw = iter(pipe.execute())
    buckets = {name: [next(raw) for _ in range(RECENT_BUCKETS)] for name in fair}
    return [replace(view, fair_by=fair[view.tool.name].by,
                    tenants=tuple(tenant_uses(buckets[view.tool.name])))
            if view.tool.name in fair else view for view in views]
