"""The gate's Redis at maxmemory with noeviction: every write is refused, the gate's own
scripts included, and each call is still answered as its tool's `on_store_error` says,
with an error an operator sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.apps.ledger import build
from tests.integration.test_celery_flow import tool
from tests.support.servers import RedisServer, private_redis
from tests.support.workers import await_outcomes, ledger
from throttle import Gate, StoreUnavailable, load_config
from throttle.keys import tool_keys
from throttle.task import fallback_reason

pytestmark = [pytest.mark.faults, pytest.mark.redis]

CONFIG = {"tools": {
    "refuses": tool(["5/1s"], "2s", on_store_error="fallback"),
    "waits": tool(["5/1s"], "2s", on_store_error="delay"),
    "runs": tool(["5/1s"], "2s", on_store_error="admit"),
}}


@pytest.fixture
def full_store(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server filled past a maxmemory set afterwards (noeviction)."""
    with private_redis(tmp_path / "full", args=["--maxmemory-policy", "noeviction"]) as server:
        client = server.client()
        client.set("ballast", "x" * 4_000_000)
        client.config_set("maxmemory", "2mb")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("one-more", "x")
        client.close()
        yield server


def test_the_gate_writes_nothing_to_a_store_at_maxmemory_and_says_why(
    full_store: RedisServer,
) -> None:
    client = full_store.client()
    gate = Gate(client, load_config(CONFIG), prefix="full")
    keys_before = client.dbsize()
    with pytest.raises(StoreUnavailable, match=r"out of memory .* raise its maxmemory"):
        gate.acquire("refuses", "A")
    with pytest.raises(StoreUnavailable, match="out of memory"):
        gate.register_call("refuses", "A", "{}", 0.0)
    assert client.dbsize() == keys_before
    assert not client.exists(tool_keys("full", "refuses").log)


@pytest.mark.celery
@pytest.mark.slow
def test_calls_against_a_full_store_are_answered_by_their_policy_with_an_error_logged(
    full_store: RedisServer, make_cluster: Any, redis_url: str, prefix: str,
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    """fallback: falls back at once; delay: retries until max_delay, then falls back;
    admit: runs ungated. The caller's registration is refused and logged as an error."""
    gate_url = full_store.url(0)
    cluster = make_cluster(CONFIG, env={"THROTTLE_REDIS_URL": gate_url,
                                        "THROTTLE_TEST_LEDGER_URL": redis_url})
    cluster.start(1, concurrency=2)
    _, _, tasks = build({**cluster.env, "THROTTLE_REDIS_URL": gate_url})
    with caplog.at_level(logging.ERROR, logger="throttle"):
        results = {name: tasks[name].delay(n=i) for i, name in enumerate(CONFIG["tools"])}
    ended = await_outcomes(list(results.values()), 20)
    reasons = {name: fallback_reason(result) for name, result in results.items()}
    logs = cluster.logs()
    print(f"\nfull store: {dict(ended)}, reasons {reasons}, "
          f"'out of memory' logged by the worker {logs.count('out of memory')}x")
    assert reasons == {"refuses": "store_unavailable", "waits": "store_unavailable",
                       "runs": None}
    assert ended == {"fallback": 2, "result": 1}
    assert [run["tool"] for run in ledger(redis_client, prefix)] == ["runs"]
    assert caplog.text.count("is enqueued but not registered for recovery") == 3
    assert "out of memory" in caplog.text and "out of memory" in logs
    assert cluster.alive() == 1
