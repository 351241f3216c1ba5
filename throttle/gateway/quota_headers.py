"""OpenAI's `x-ratelimit-*` response headers for a tool's daily quota.

`x-ratelimit-limit-<kind>`, `x-ratelimit-remaining-<kind>` and `x-ratelimit-reset-<kind>`
(a duration such as "6h0m0s" or "1.5s"), where kind is `tokens` for a weighted tool and
`requests` otherwise. With several quotas the one with the least left is reported. Read
from the gate's quota hash (one HMGET); nothing is added for a tool without a quota.
"""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio

from throttle.config import ToolConfig
from throttle.keys import keys_for, quota_key
from throttle.quotas import quota_uses, today_fields

logger = logging.getLogger("throttle.gateway")


def openai_duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: "1s", "6m0s", "2h5m3s", "0.5s"."""
    if seconds < 60:
        return f"{max(0.0, seconds):.3g}s"
    whole = int(seconds)
    hours, minutes, secs = whole // 3600, whole % 3600 // 60, whole % 60
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


async def quota_headers(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster, prefix: str, tool: ToolConfig,
    key_value: object,
) -> dict[str, str]:
    """The x-ratelimit-* headers of `tool`'s tightest daily quota ({} without one)."""
    if not tool.quotas:
        return {}
    fields, resets_at_s = today_fields(tool.quotas, tool.quota_tz)
    try:
        used = await client.hmget(quota_key(keys_for(prefix, tool, key_value)), fields)
    except (redis.RedisError, OSError) as exc:  # the answer matters more than its headers
        logger.warning("tool %s: quota headers left out (%s)", tool.name, exc)
        return {}
    tightest = min(quota_uses(tool.quotas, list(used), resets_at_s), key=lambda use: use.remaining)
    kind = "requests" if tool.cost == 1 else "tokens"
    return {
        f"x-ratelimit-limit-{kind}": str(tightest.max),
        f"x-ratelimit-remaining-{kind}": f"{tightest.remaining:g}",
        f"x-ratelimit-reset-{kind}": openai_duration(tightest.resets_at_s - time.time()),
    }
