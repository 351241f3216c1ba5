"""OpenAI's `x-ratelimit-*` response headers for a tool's daily quota.

`x-ratelimit-limit-<kind>`, `x-ratelimit-remaining-<kind>` and `x-ratelimit-reset-<kind>`
(a duration such as "6h0m0s" or "1.5s"), where kind is `tokens` for a weighted tool and
`requests` otherwise. With several quotas (the tool's, its class's allowance of its pool's)
the one with the least left is reported. Quotas set live count: the overrides and the quota
hashes are read in one pipelined round trip; nothing is added for a tool without a quota.

`QuotaHeaders` spares that round trip for a tool that has no quota in the file (nor its
pool) while no live override exists at all: it checks the overrides' index (HLEN) at most
every `REFRESH_S`, so a quota set live shows in the headers within that time (the gate
enforces it from the next decision on).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import redis
import redis.asyncio

from throttle.config import Config, ToolConfig
from throttle.keys import (
    keys_for,
    override_fields,
    overrides_index_key,
    overrides_key,
    pool_overrides_key,
    pool_quota_key,
    quota_key,
    tool_defaults_key,
)
from throttle.live_defaults import REFRESH_S
from throttle.overrides import decode, in_force
from throttle.quotas import day_bounds_ms, days_tz

logger = logging.getLogger("throttle.gateway")


def openai_duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: "1s", "6m0s", "2h5m3s", "0.5s"."""
    if seconds < 60:
        return f"{max(0.0, seconds):.3g}s"
    whole = int(seconds)
    hours, minutes, secs = whole // 3600, whole % 3600 // 60, whole % 60
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


async def quota_headers(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster, prefix: str, config: Config,
    tool: ToolConfig, key_value: object,
) -> dict[str, str]:
    """The x-ratelimit-* headers of the tightest daily quota in force for a call of `tool`:
    its own (a tier's, or one set live) or its class's allowance of its pool's ({} if none)."""
    key_value = key_value if tool.key else None
    pool = config.pools[tool.pool] if tool.pool else None
    tool_field, tier_field = override_fields(tool.name, key_value)
    pipe = client.pipeline(transaction=False)
    pipe.hmget(overrides_key(prefix, tool, key_value), [tier_field or tool_field, tool_field])
    pipe.hget(tool_defaults_key(prefix), tool_field)
    pipe.hgetall(quota_key(keys_for(prefix, tool, key_value)))
    if pool:
        pipe.hget(pool_overrides_key(prefix, pool.name), "pool")
        pipe.hgetall(pool_quota_key(prefix, pool.name))
    try:
        raw = await pipe.execute()
    except (redis.RedisError, OSError) as exc:  # the answer matters more than its headers
        logger.warning("tool %s: quota headers left out (%s)", tool.name, exc)
        return {}
    (tier, own), default, used = raw[:3]
    live = next((found for text in (tier, own, default) if text
                 for found in [decode(_text(text))] if found), None)
    _, today, tomorrow, _ = day_bounds_ms(time.time(), days_tz(tool, config))
    left = [(float(quota.max), quota.max - _used(used, i, today))
            for i, quota in enumerate(in_force(live, tool.limits, tool.quotas)[1], 1)]
    if pool and tool.priority:
        share = pool.shares[tool.priority]
        pool_live = decode(_text(raw[3])) if raw[3] else None
        left += [(share * quota.max, share * quota.max - _used(raw[4], i, today))
                 for i, quota in enumerate(in_force(pool_live, pool.limits, pool.quotas)[1], 1)]
    if not left:
        return {}
    limit, remaining = min(left, key=lambda pair: pair[1])
    kind = "requests" if tool.cost == 1 else "tokens"
    return {
        f"x-ratelimit-limit-{kind}": f"{limit:g}",
        f"x-ratelimit-remaining-{kind}": f"{max(0.0, remaining):g}",
        f"x-ratelimit-reset-{kind}": openai_duration(tomorrow / 1000 - time.time()),
    }


class QuotaHeaders:
    """`quota_headers` for one gateway, without a round trip for calls no quota can apply to."""

    def __init__(self, client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
                 prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._overrides_checked_at = -math.inf
        self._no_overrides = False
        self._checking: asyncio.Task[bool] | None = None  # the check under way, shared

    async def __call__(self, config: Config, tool: ToolConfig,
                       key_value: object) -> dict[str, str]:
        pool = config.pools[tool.pool] if tool.pool else None
        in_file = tool.quotas or (pool is not None and tool.priority and pool.quotas)
        if not in_file and await self._none_live():
            return {}
        return await quota_headers(self.client, self.prefix, config, tool, key_value)

    async def _none_live(self) -> bool:
        """Whether no live override existed at the last check (made now when due; the calls
        arriving while it is under way wait for it instead of each sending their own)."""
        if time.monotonic() - self._overrides_checked_at < REFRESH_S:
            return self._no_overrides
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._check())
            self._checking.add_done_callback(self._checked)
        return await asyncio.shield(self._checking)

    async def _check(self) -> bool:
        try:
            count = await self.client.hlen(overrides_index_key(self.prefix))
        except (redis.RedisError, OSError):  # quota_headers says what failed
            return False
        self._overrides_checked_at = time.monotonic()
        self._no_overrides = not count
        return self._no_overrides

    def _checked(self, _: asyncio.Task[bool]) -> None:
        self._checking = None


def _used(day_use: dict[Any, Any], index: int, today_ms: int) -> float:
    value = day_use.get(f"{index}:{today_ms}".encode(), day_use.get(f"{index}:{today_ms}"))
    return float(value or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
