"""A daily quota's remaining units and reset time, as `throttle status` and the exporter
show them (read from the gate's own quota hash, after real gate decisions)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.monitoring import exporter, ledger_tool, scrape, value
from tests.support.servers import write_config
from throttle import Action, Gate, load_config
from throttle.cli import main
from throttle.overrides import parse_limits, set_override

pytestmark = [pytest.mark.redis]

CONFIG = {"tools": {"quoted": ledger_tool(["100/1s", "5/1d"], "10s",
                                          quota_tz="America/New_York")}}


def _spend(redis_url: str, prefix: str, calls: int) -> None:
    gate = Gate(redis_url, load_config(CONFIG), prefix=prefix)
    assert all(gate.acquire("quoted", f"m{i}").action is Action.ADMIT for i in range(calls))
    gate.close()


def test_status_shows_what_is_left_of_a_daily_quota_and_when_it_resets(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path
) -> None:
    _spend(redis_url, prefix, 2)
    path = write_config(CONFIG, tmp_path / "tools.toml")
    done = CliRunner().invoke(main, ["status", "--redis-url", redis_url, "--broker-url",
                                     redis_dbs[0], "--prefix", prefix, "--config", str(path)],
                              env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    print(done.output)
    found = re.search(r"quota quoted: 3 of 5 left today, resets in (\d+)h(\d\d)m "
                      r"\(midnight America/New_York\)", done.output)
    assert found and int(found[1]) * 60 + int(found[2]) <= 24 * 60


def test_the_exporter_exports_a_quotas_remaining_units_and_reset(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path
) -> None:
    _spend(redis_url, prefix, 4)
    with exporter(tmp_path, CONFIG, redis_url=redis_url, broker_url=redis_dbs[0],
                  prefix=prefix) as url:
        samples = scrape(url)
    assert value(samples, "throttle_quota_remaining", tool="quoted", quota="5/1d") == 1
    reset = value(samples, "throttle_quota_reset_seconds", tool="quoted", quota="5/1d")
    assert reset is not None and 0 < reset <= 25 * 3600  # a DST day lasts 25 h


POOL_QUOTA = {
    "pools": {"llm": {"limits": ["100/1s", "10/1d"], "shares": {"high": 1.0},
                      "quota_tz": "Asia/Tokyo"}},
    "tools": {"chat": ledger_tool(["100/1s"], "10s", pool="llm", priority="high"),
              "quoted": ledger_tool(["100/1s", "5/1d"], "10s")},
}


def test_status_and_the_exporter_show_a_pools_quota_and_a_quota_set_live(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path
) -> None:
    config = load_config(POOL_QUOTA)
    gate = Gate(redis_url, config, prefix=prefix)
    assert all(gate.acquire("chat", f"c{i}").action is Action.ADMIT for i in range(3))
    assert gate.acquire("quoted", "q").action is Action.ADMIT
    set_override(gate.client, config, prefix, parse_limits(["8/1d"]), tool="quoted")
    gate.close()
    path = write_config(POOL_QUOTA, tmp_path / "tools.toml")
    done = CliRunner().invoke(main, ["status", "--redis-url", redis_url, "--broker-url",
                                     redis_dbs[0], "--prefix", prefix, "--config", str(path)],
                              env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    print(done.output)
    assert re.search(r"quota pool llm: 7 of 10 left today, resets in \d+h\d\dm "
                     r"\(midnight Asia/Tokyo\)", done.output)
    assert "quota quoted: 7 of 8 left today" in done.output  # the live quota, not the file's
    with exporter(tmp_path, POOL_QUOTA, redis_url=redis_url, broker_url=redis_dbs[0],
                  prefix=prefix) as url:
        samples = scrape(url)
    assert value(samples, "throttle_pool_quota_remaining", pool="llm", quota="10/1d") == 7
    reset = value(samples, "throttle_pool_quota_reset_seconds", pool="llm", quota="10/1d")
    assert reset is not None and 0 < reset <= 25 * 3600
    assert value(samples, "throttle_quota_remaining", tool="quoted", quota="8/1d") == 7


def test_the_gateways_headers_report_a_quota_set_live_and_a_pools_class_allowance(
    redis_url: str, prefix: str
) -> None:
    import asyncio

    import redis.asyncio

    from throttle.gateway.quota_headers import quota_headers

    config = load_config(POOL_QUOTA)
    gate = Gate(redis_url, config, prefix=prefix)
    assert all(gate.acquire("chat", f"c{i}").action is Action.ADMIT for i in range(3))
    assert gate.acquire("quoted", "q").action is Action.ADMIT

    async def headers(tool: str) -> dict[str, str]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await quota_headers(client, prefix, config, config.tool(tool), None)
        finally:
            await client.aclose()

    assert asyncio.run(headers("quoted"))["x-ratelimit-remaining-requests"] == "4"  # of 5
    set_override(gate.client, config, prefix, parse_limits(["9/1d"]), tool="quoted")
    found = asyncio.run(headers("quoted"))
    assert (found["x-ratelimit-limit-requests"], found["x-ratelimit-remaining-requests"]) == (
        "9", "8")
    pooled = asyncio.run(headers("chat"))  # no quota of its own: its pool's, 3 of 10 used
    assert (pooled["x-ratelimit-limit-requests"], pooled["x-ratelimit-remaining-requests"]) == (
        "10", "7")
    gate.close()
