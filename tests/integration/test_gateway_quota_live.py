"""The gateway's quota headers for a tool with no quota in its file: none while no live
override exists (no round trip per call), and a quota set live shows within `REFRESH_S`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio

from tests.support.monitoring import ledger_tool
from throttle import Action, Gate, load_config
from throttle.gateway.quota_headers import QuotaHeaders
from throttle.live_defaults import REFRESH_S
from throttle.overrides import parse_limits, reset_override, set_override

pytestmark = [pytest.mark.redis]

CONFIG = {"tools": {"plain": ledger_tool(["100/1s"], "10s")}}


def test_a_quota_set_live_shows_in_the_headers_within_the_refresh_time_and_goes_with_it(
    redis_url: str, prefix: str,
) -> None:
    config = load_config(CONFIG)
    gate = Gate(redis_url, config, prefix=prefix)
    assert gate.acquire("plain", "m1").action is Action.ADMIT

    async def scenario() -> list[dict[str, str]]:
        client = redis.asyncio.Redis.from_url(redis_url)
        headers = QuotaHeaders(client, prefix)
        seen = [await headers(config, config.tool("plain"), None)]
        set_override(gate.client, config, prefix, parse_limits(["9/1d"]), tool="plain")
        await asyncio.sleep(REFRESH_S + 0.05)
        seen.append(await headers(config, config.tool("plain"), None))
        reset_override(gate.client, config, prefix, tool="plain")
        await asyncio.sleep(REFRESH_S + 0.05)
        seen.append(await headers(config, config.tool("plain"), None))
        await client.aclose()
        return seen

    started = time.monotonic()
    before, live, after = asyncio.run(scenario())
    gate.close()
    assert time.monotonic() - started < 10 * REFRESH_S
    assert before == {} and after == {}
    assert (live["x-ratelimit-limit-requests"], live["x-ratelimit-remaining-requests"]) == (
        "9", "9")  # the call before counted on no quota, so all 9 are left


class CountingRedis(redis.asyncio.Redis):
    """A client that counts its HLENs (the check for live overrides)."""

    hlens = 0

    def hlen(self, name: Any) -> Any:
        self.hlens += 1
        return super().hlen(name)


def test_calls_arriving_together_share_one_check_for_live_overrides(
    redis_url: str, prefix: str,
) -> None:
    config = load_config(CONFIG)

    async def scenario() -> tuple[int, list[dict[str, str]]]:
        client = CountingRedis.from_url(redis_url)
        headers = QuotaHeaders(client, prefix)
        answers = await asyncio.gather(*(headers(config, config.tool("plain"), None)
                                         for _ in range(20)))
        answers.append(await headers(config, config.tool("plain"), None))
        await client.aclose()
        return client.hlens, answers

    hlens, answers = asyncio.run(scenario())
    assert hlens == 1 and answers == [{}] * 21
