"""Calendar quotas: units per calendar day in a tool's `quota_tz`, beside its sliding windows.

acquire.lua charges a call's units to the day of its slot when it takes the slot (admitted
or reserved) and gives them back when a reserved call is dropped; a call whose day is spent
is told to come back when the quota resets (`delay`, reason `quota`, no reservation) or
falls back when that is past its deadline. The script reads the server's clock; the worker
passes the day boundaries around its own clock (yesterday, today, tomorrow, the day after),
so a worker clock off by less than a day still finds the right day.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from throttle.config import ToolConfig
from throttle.keys import ToolKeys, quota_key
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


def quota_args(tool: ToolConfig, now_s: float | None) -> list[Any]:
    """The quota arguments of acquire.lua: count, the four day bounds, each quota's max."""
    if not tool.quotas:
        return [0]
    bounds = day_bounds_ms(time.time() if now_s is None else now_s, tool.quota_tz)
    return [len(tool.quotas), *bounds, *(quota.max for quota in tool.quotas)]


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """A quota now: its limit, the units used today and when it resets (epoch seconds)."""

    max: int
    used: float
    resets_at_s: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.max - self.used)


def today_fields(tool: ToolConfig, now_s: float | None = None) -> tuple[list[str], float]:
    """The quota hash's fields for today, one per quota, and when today ends (epoch s)."""
    _, today, tomorrow, _ = day_bounds_ms(time.time() if now_s is None else now_s, tool.quota_tz)
    return [f"{i}:{today}" for i in range(1, len(tool.quotas) + 1)], tomorrow / 1000


def quota_uses(tool: ToolConfig, used: list[Any], resets_at_s: float) -> list[QuotaUse]:
    """QuotaUse per quota from the values read at `today_fields`."""
    return [QuotaUse(quota.max, float(value or 0), resets_at_s)
            for quota, value in zip(tool.quotas, used, strict=True)]


def read_quotas(client: StoreClient, tool: ToolConfig, keys: ToolKeys,
                now_s: float | None = None) -> list[QuotaUse]:
    """Today's use of each of `tool`'s quotas (for one key value's `keys`)."""
    if not tool.quotas:
        return []
    fields, resets_at_s = today_fields(tool, now_s)
    return quota_uses(tool, client.hmget(quota_key(keys), fields), resets_at_s)
