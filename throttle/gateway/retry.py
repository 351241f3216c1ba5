"""How long a throttled caller should wait before trying again (the 429's Retry-After).

Read from the gate's own keys in one pipeline: the tool's (or its pool's) cooldown, and
when the tool's windows next have room. A call retried then gets a slot within its
deadline if nothing else arrives first. For a unit-cost tool the room comes from the log
itself: a limit of `max` per `W` has room once its max-th newest entry (admission or
reservation) is W (plus the tool's slot margin) old. For weighted tools (tokens) only the
newest entry is known cheaply.
"""

from __future__ import annotations

import logging
import math

import redis
import redis.asyncio

from throttle.config import ToolConfig
from throttle.keys import cooldown_left_s, keys_for

logger = logging.getLogger("throttle.gateway")


async def retry_after_s(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster, prefix: str, tool: ToolConfig,
    key_value: object, budget_s: float,
) -> int:
    """Whole seconds (at least 1) until a call of `tool` with this deadline could fit."""
    keys = keys_for(prefix, tool, key_value)
    unit_limits = tool.limits if tool.cost == 1 else ()
    try:
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.pttl(keys.cooldown)
        pipe.zrange(keys.log, -1, -1, withscores=True)
        for limit in unit_limits:
            pipe.zrange(keys.log, -limit.max, -limit.max, withscores=True)
        raw = await pipe.execute()
    except (redis.RedisError, OSError) as exc:
        logger.warning("tool %s: Retry-After not read from the gate (%s); saying 1s",
                       tool.name, exc)
        return 1
    seconds, micros = raw[0]
    now_ms = seconds * 1000 + micros / 1000
    cooldown_s = cooldown_left_s(raw[1])
    free_ms = max([now_ms] + [score for _, score in raw[2]])
    for limit, entry in zip(unit_limits, raw[3:], strict=True):
        for _, score in entry:
            free_ms = max(free_ms, score + limit.window_ms + tool.slot_margin_ms)
    longest_s = max(limit.window_ms for limit in tool.limits) / 1000
    room_s = min((free_ms - now_ms) / 1000 - budget_s, longest_s)
    return max(1, math.ceil(max(cooldown_s, float(room_s))))
