"""Calendar quotas: units per calendar day in a tool's `quota_tz`, beside its sliding windows.

acquire.lua charges a call's units to the day of its slot when it takes the slot (admitted
or reserved) and gives them back when a reserved call is dropped; a call whose day is spent
is told to come back when the quota resets (`delay`, reason `quota`, no reservation) or
falls back when that is past its deadline. The script reads the server's clock; the worker
passes the day boundaries around its own clock (yesterday, today, tomorrow, the day after),
so a worker clock off by less than a day still finds the right day.

A pool's quotas ("N/1d" among its limits) count every tool of the pool in one hash; a class
may use its share of them, as of the pool's sliding limits. A live override
(throttle/overrides.py) may replace a tool's, a tier's or a pool's quotas: quota i of the
override counts on today's use of quota i.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from throttle.config import Config, PoolConfig, ToolConfig
from throttle.keys import ToolKeys, pool_quota_key, quota_key
from throttle.limit import Limit
from throttle.scripts import encode
from throttle.store import StoreClient


def day_bounds_ms(now_s: float, tz: str) -> tuple[int, int, int, int]:
    """Midnights in `tz` (epoch ms): the starts of yesterday, today, tomorrow, the day after."""
    zone = ZoneInfo(tz)
    today = datetime.fromtimestamp(now_s, zone).date()
    return tuple(  # type: ignore[return-value]
        int(datetime.combine(today + timedelta(days=offset), datetime.min.time(), zone)
            .timestamp() * 1000)
        for offset in (-1, 0, 1, 2)
    )


class DayBounds:
    """`day_bounds_ms` of one time zone as acquire.lua takes them (one argument: four
    decimal numbers), computed again only when the day has turned: a decision pays a
    comparison, not a time zone."""

    __slots__ = ("_bounds", "_today_ms", "_tomorrow_ms", "tz")

    def __init__(self, tz: str) -> None:
        self.tz = tz
        self._today_ms, self._tomorrow_ms = math.inf, -math.inf
        self._bounds = b""

    def at(self, now_s: float | None) -> bytes:
        """The four bounds around `now_s` (the clock when None)."""
        now_ms = (time.time() if now_s is None else now_s) * 1000
        if not self._today_ms <= now_ms < self._tomorrow_ms:
            bounds = day_bounds_ms(now_ms / 1000, self.tz)
            self._today_ms, self._tomorrow_ms = bounds[1], bounds[2]
            self._bounds = b" ".join(b"%d" % bound for bound in bounds)
        return self._bounds


def quota_tail(config: Config, tool: ToolConfig, quotas: Sequence[Limit]
               ) -> tuple[bytes, list[bytes]]:
    """acquire.lua's quota arguments but the day bounds: the count, then (after the bounds)
    each quota's max and the pool's quotas (their count, then the class's allowance of each)."""
    pool = config.pools[tool.pool] if tool.pool else None
    share = pool.shares[tool.priority] if pool and tool.priority else 1
    pool_quotas = pool.quotas if pool else ()
    return encode(len(quotas)), [
        *(encode(quota.max) for quota in quotas), encode(len(pool_quotas)),
        *(encode(share * quota.max) for quota in pool_quotas)]


def days_tz(tool: ToolConfig, config: Config) -> str:
    """The time zone whose days a tool's quotas count: its pool's for a tool in a pool."""
    return config.pools[tool.pool].quota_tz if tool.pool else tool.quota_tz


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """A quota now: its limit, the units used today and when it resets (epoch seconds)."""

    max: int
    used: float
    resets_at_s: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.max - self.used)


def today_fields(quotas: Sequence[Limit], tz: str,
                 now_s: float | None = None) -> tuple[list[str], float]:
    """The quota hash's fields for today, one per quota, and when today ends (epoch s)."""
    _, today, tomorrow, _ = day_bounds_ms(time.time() if now_s is None else now_s, tz)
    return [f"{i}:{today}" for i in range(1, len(quotas) + 1)], tomorrow / 1000


def quota_uses(quotas: Sequence[Limit], used: list[Any], resets_at_s: float) -> list[QuotaUse]:
    """QuotaUse per quota from the values read at `today_fields`."""
    return [QuotaUse(quota.max, float(value or 0), resets_at_s)
            for quota, value in zip(quotas, used, strict=True)]


def read_quotas(client: StoreClient, tool: ToolConfig, keys: ToolKeys,
                now_s: float | None = None,
                quotas: Sequence[Limit] | None = None) -> list[QuotaUse]:
    """Today's use of `tool`'s quotas (for one key value's `keys`); `quotas` in force, when
    an override replaced the file's."""
    quotas = tool.quotas if quotas is None else quotas
    return _read(client, quota_key(keys), quotas, tool.quota_tz, now_s)


def read_pool_quotas(client: StoreClient, prefix: str, pool: PoolConfig,
                     now_s: float | None = None,
                     quotas: Sequence[Limit] | None = None) -> list[QuotaUse]:
    """Today's use of a pool's quotas (all its tools together), against their full max."""
    quotas = pool.quotas if quotas is None else quotas
    return _read(client, pool_quota_key(prefix, pool.name), quotas, pool.quota_tz, now_s)


def _read(client: StoreClient, quota_hash: str, quotas: Sequence[Limit], tz: str,
          now_s: float | None) -> list[QuotaUse]:
    if not quotas:
        return []
    fields, resets_at_s = today_fields(quotas, tz, now_s)
    return quota_uses(quotas, client.hmget(quota_hash, fields), resets_at_s)
