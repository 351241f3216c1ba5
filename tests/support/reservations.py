"""The reservations a tool's gate keys hold, read the way the gate reads them.

A held call is stored once, as an entry of the tool's log. While the log may hold
reservations, its `adm` set names every admission in it (and '' at +inf), so a reservation
is a log entry not in adm; without adm, every entry of the log is an admission.
"""

from __future__ import annotations

from typing import Any

import redis

from throttle.keys import ToolKeys, reserved_in


def reservations(client: redis.Redis, keys: ToolKeys) -> dict[bytes, float]:
    """Member -> slot (ms) of every reservation in `keys`' log, by slot (one transaction)."""
    pipe = client.pipeline(transaction=True)
    pipe.zrange(keys.log, 0, -1, withscores=True)
    pipe.zrange(keys.adm, 0, -1)
    log, admitted = pipe.execute()
    return reserved_in(log, admitted)


async def reservations_async(client: Any, keys: ToolKeys) -> dict[bytes, float]:
    """`reservations` through an asyncio client."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.zrange(keys.log, 0, -1, withscores=True)
        pipe.zrange(keys.adm, 0, -1)
        log, admitted = await pipe.execute()
    return reserved_in(log, admitted)
