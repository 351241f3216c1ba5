"""Servers failing under a burst: the gate's Redis restarted, the broker's Redis killed and
restarted from its append-only file, a RabbitMQ connection cut. Every call must end (a
result or a fallback), and no window may hold more than its limit where the docs promise it.

Each test keeps the ledger and the results on the faults suite's private Redis, which stays
up, and breaks another server of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.test_celery_flow import burst, tool
from tests.support.pools import GEVENT, PREFORK, WorkerPool, pool_params
from tests.support.rabbit import address, rabbitmq_queue, with_port
from tests.support.relay import Relay
from tests.support.servers import RedisServer, private_redis
from tests.support.workers import check_ledger, ledger, most_in_window

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def wait_for_runs(client: redis.Redis, prefix: str, count: int, timeout_s: float = 30) -> None:
    """Wait until the ledger holds `count` bodies (mid-burst); fail if it does not in time."""
    deadline = time.monotonic() + timeout_s
    while client.llen(f"{prefix}:ledger") < count:
        assert time.monotonic() < deadline, (
            f"only {client.llen(f'{prefix}:ledger')} of {count} bodies ran in {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture
def spare_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A second private Redis, with an append-only file fsynced on every write, to break."""
    with private_redis(tmp_path / "spare", appendonly=True,
                       args=["--appendfsync", "always"]) as server:
        yield server


@pytest.mark.parametrize("pool", pool_params(PREFORK, GEVENT))
def test_the_gates_redis_restarted_mid_burst_loses_no_call_and_keeps_fail_closed_windows(
    make_cluster: Any, redis_url: str, redis_client: redis.Redis, prefix: str,
    spare_redis: RedisServer, pool: WorkerPool,
) -> None:
    """1,000 calls over two tools at 50/1s; the gate's Redis restarts (down 2 s) mid-burst.

    The gate's Redis keeps an append-only file, so the windows survive the restart. The
    `strict` tool (on_store_error = fallback) never exceeds its limit; the `blind` tool
    (admit) may exceed it only by the calls it admitted without the gate, while the store was
    down (docs/gate.md): its admissions outside the outage hold the limit exactly.
    """
    config = {"tools": {
        "strict": tool(["50/1s"], "40s", on_store_error="fallback"),
        "blind": tool(["50/1s"], "40s", on_store_error="admit"),
    }}
    cluster = make_cluster(config, env={"THROTTLE_REDIS_URL": spare_redis.url(0),
                                        "THROTTLE_TEST_LEDGER_URL": redis_url})
    results = burst(cluster, "strict", 500)[0] + burst(cluster, "blind", 500)[0]
    cluster.start(3, concurrency=pool.concurrency, extra=pool.extra)
    wait_for_runs(redis_client, prefix, 300)
    down_at = time.time()
    spare_redis.restart(down_s=2)
    up_at = time.time()
    strict = check_ledger(results[:500], redis_client, prefix, window_s=1.0, timeout_s=60,
                          tool="strict")
    blind = check_ledger(results[500:], redis_client, prefix, window_s=1.0, timeout_s=5,
                         tool="blind")
    logs = cluster.logs()
    blind_admits = logs.count("applying on_store_error=admit")
    strict_fallbacks = logs.count("applying on_store_error=fallback")
    blind_runs = [run["admitted_at"] for run in ledger(redis_client, prefix)
                  if run["tool"] == "blind"]
    during = [at for at in blind_runs if down_at <= at <= up_at]
    gated = [at for at in blind_runs if not down_at <= at <= up_at]
    print(f"\ngate Redis restarted mid-burst (-P {pool.name}): strict (fallback) {strict}/50, "
          f"{strict_fallbacks} store errors; blind (admit) {blind}/50, {blind_admits} admitted "
          f"without the gate, {len(during)} admitted during the outage, the others at most "
          f"{most_in_window(gated, 1.0)} in 1 s")
    for check in (strict, blind):
        assert check.lost == 0 and check.ended["failure"] == 0 and check.run_twice == 0
    # The restart did cut the gate off: both policies were applied.
    assert strict_fallbacks >= 1 and blind_admits >= 1
    assert len(during) >= blind_admits  # every blind admission happened during the outage
    assert strict.most <= 50
    assert most_in_window(gated, 1.0) <= 50


@pytest.mark.parametrize("pool", pool_params(PREFORK, GEVENT))
def test_the_brokers_redis_killed_and_restarted_from_its_aof_loses_no_call(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    spare_redis: RedisServer, pool: WorkerPool,
) -> None:
    """2,000 calls at 200/1s; the broker's Redis is SIGKILLed mid-burst and restarted 1 s
    later from its append-only file. Calls whose messages die with it are re-published by
    the reaper (throttle/recovery.py); bodies run twice at most as often as messages were
    unacked at the kill. Every worker survives the kill (throttle/consumer.py)."""
    # max_delay 30 s: the 10 s burst fits with room to spare, and a lost call is reaped (and
    # answered) at its deadline + REAP_AFTER_S, 35 s after it was sent instead of 65 s.
    config = {"broker": {"visibility_timeout": "90s"}, "tools": {"busy": tool(["200/1s"], "30s")}}
    broker = spare_redis.url(1)
    cluster = make_cluster(config, broker_url=broker)
    results, _ = burst(cluster, "busy", 2000)  # queued before any worker runs
    cluster.start(3, concurrency=pool.concurrency, extra=pool.extra)
    wait_for_runs(redis_client, prefix, 600)
    unacked = redis.Redis.from_url(broker).hlen("unacked")
    spare_redis.restart(hard=True, down_s=1)
    check = check_ledger(results, redis_client, prefix, window_s=1.0, timeout_s=75)
    logs = cluster.logs()
    reaped = logs.count("never reached the gate")
    print(f"\nbroker Redis SIGKILLed and restarted (AOF, -P {pool.name}): {check}/200; "
          f"unacked at the kill {unacked}, calls re-published by the reaper {reaped}; "
          f"workers alive {cluster.alive()}/3, connections closed uncleanly "
          f"{logs.count('could not be closed')}")
    assert "Unrecoverable error" not in logs and cluster.alive() == 3, logs[-3000:]
    assert check.lost == 0 and check.ended["failure"] == 0
    assert check.run_twice <= unacked
    # Only calls whose messages died are re-published, never the backlog still queued (a
    # reaper that ignored the queue re-published 1,249 of these 2,000 calls).
    assert reaped <= unacked + 20
    assert check.most <= 200


@pytest.fixture
def rabbitmq_via_relay() -> Iterator[tuple[str, Relay]]:
    """RabbitMQ behind a loopback relay that can cut the connections."""
    with rabbitmq_queue("tool.rabbitcut") as url, Relay(*address(url)) as relay:
        yield with_port(url, relay.port), relay


@pytest.mark.rabbitmq
@pytest.mark.parametrize("pool", pool_params(PREFORK, GEVENT))
def test_a_rabbitmq_connection_cut_mid_burst_loses_no_call(
    make_cluster: Any, redis_client: redis.Redis, prefix: str,
    rabbitmq_via_relay: tuple[str, Relay], pool: WorkerPool,
) -> None:
    """600 calls at 50/1s through RabbitMQ; every connection is cut twice mid-burst."""
    broker, relay = rabbitmq_via_relay
    config = {"tools": {"rabbitcut": tool(["50/1s"], "20s")}}
    cluster = make_cluster(config, broker_url=broker)
    cluster.start(2, concurrency=pool.concurrency, extra=pool.extra)
    results, _ = burst(cluster, "rabbitcut", 600)
    for _ in range(2):
        time.sleep(2.5)
        relay.cut()
    check = check_ledger(results, redis_client, prefix, window_s=1.0, timeout_s=75)
    print(f"\nRabbitMQ connections cut x{relay.cuts} (-P {pool.name}): {check}/50")
    assert check.lost == 0 and check.ended["failure"] == 0
    assert check.most <= 50
