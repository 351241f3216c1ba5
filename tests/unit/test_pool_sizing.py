"""A worker sizes the broker's, the producers' and the gate's connection pools for its
concurrency (see throttle/pools.py), keeping settings the user chose and naming the fix
when one is too small."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import _set_task_join_will_block

from throttle import Throttle, load_config
from throttle.pools import HEADROOM, connections_for, size_pools

TOOLS: dict[str, Any] = {"tools": {"search": {"limits": ["5/1s"], "max_delay": "30s"}}}


@pytest.fixture(autouse=True)
def _no_worker_left_behind() -> Iterator[None]:
    """A WorkController marks this process as a worker (result.get() then refuses to block):
    undo it, so later tests in the same process are not taken for tasks."""
    yield
    _set_task_join_will_block(False)


def app_with(broker: str = "redis://127.0.0.1:6379/15", **settings: Any) -> Celery:
    app = Celery("pools", broker=broker, backend="redis://127.0.0.1:6379/15",
                 set_as_current=False)
    app.conf.update(settings)
    return app


def test_untouched_pools_grow_to_the_concurrency_plus_headroom() -> None:
    app = app_with()
    assert size_pools(app.conf, 50, redis_broker=True) == []
    assert app.conf.broker_transport_options["max_connections"] == 50 + HEADROOM
    assert app.conf.broker_pool_limit == 50 + HEADROOM
    # The result backend's pool: redis-py opens at most 100 when Celery passes None.
    assert app.conf.redis_max_connections == 100


def test_a_large_concurrency_raises_the_result_backends_pool_past_redis_pys_100() -> None:
    app = app_with()
    assert size_pools(app.conf, 200, redis_broker=True) == []
    assert app.conf.redis_max_connections == 200 + HEADROOM


def test_a_small_concurrency_keeps_celerys_producer_pool() -> None:
    app = app_with()
    size_pools(app.conf, 1, redis_broker=True)
    assert app.conf.broker_pool_limit == 11  # Celery's 10 is not lowered
    assert app.conf.broker_transport_options["max_connections"] == 1 + HEADROOM


def test_limits_the_user_set_too_low_are_kept_and_named_with_the_fix() -> None:
    app = app_with(broker_transport_options={"max_connections": 10}, broker_pool_limit=4,
                   redis_max_connections=20)
    problems = size_pools(app.conf, 50, redis_broker=True)
    assert app.conf.broker_transport_options["max_connections"] == 10
    assert app.conf.broker_pool_limit == 4
    assert len(problems) == 3
    assert "max_connections'] = 10 is below the 60 connections" in problems[0]
    assert "raise it to 60 or remove it" in problems[0]
    assert "broker_pool_limit = 4 is below the worker's concurrency (50)" in problems[1]
    assert "redis_max_connections = 20" in problems[2] and "raise it to 60" in problems[2]


def test_a_broker_pool_left_to_redis_pys_default_is_named_when_too_small() -> None:
    app = app_with(broker_transport_options={"max_connections": None})
    problems = size_pools(app.conf, 120, redis_broker=True)
    assert problems == [
        "broker_transport_options['max_connections'] = None (redis-py: 100) is below the 130 "
        "connections a node of concurrency 120 may use at once: acks fail with "
        "MaxConnectionsError; raise it to 130 or remove it"
    ]


def test_limits_the_user_set_high_enough_pass_without_a_word() -> None:
    app = app_with(broker_transport_options={"max_connections": 100}, broker_pool_limit=None)
    assert size_pools(app.conf, 50, redis_broker=True) == []
    assert app.conf.broker_transport_options["max_connections"] == 100
    assert app.conf.broker_pool_limit is None  # no pool: a connection per publish


def test_a_rabbitmq_broker_gets_no_redis_transport_option() -> None:
    app = app_with("amqp://guest:guest@127.0.0.1:5672//")
    size_pools(app.conf, 50, redis_broker=False)
    assert "max_connections" not in (app.conf.broker_transport_options or {})
    assert app.conf.broker_pool_limit == 50 + HEADROOM


def test_a_concurrency_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1, got 0"):
        connections_for(0)


@pytest.mark.parametrize(("pool", "concurrency"), [("threads", 150), ("solo", 1), ("prefork", 3)])
def test_a_worker_sizes_every_pool_for_its_concurrency_before_it_connects(
    pool: str, concurrency: int
) -> None:
    app = app_with()
    throttle = Throttle(app, load_config(TOOLS), "redis://127.0.0.1:6379/15")
    # redis-py's default pool raises MaxConnectionsError past 100 connections.
    assert not isinstance(throttle.gate.client.connection_pool, redis.BlockingConnectionPool)
    # Building the worker runs its bootsteps' setup; nothing connects until it starts.
    app.WorkController(concurrency=concurrency, pool_cls=pool, without_heartbeat=True,
                       without_mingle=True, without_gossip=True, quiet=True)
    needed = concurrency + HEADROOM
    assert app.conf.broker_transport_options["max_connections"] == needed
    assert app.conf.broker_pool_limit == max(10, needed)
    assert app.pool.limit == max(10, needed)  # the producers' pool, made after the sizing
    assert app.backend.max_connections == max(100, needed)  # made after the sizing too
    gate_pool = throttle.gate.client.connection_pool
    assert isinstance(gate_pool, redis.BlockingConnectionPool)
    assert gate_pool.max_connections == needed


def test_an_autoscaling_worker_sizes_for_its_maximum() -> None:
    app = app_with()
    Throttle(app, load_config(TOOLS), "redis://127.0.0.1:6379/15")
    app.WorkController(concurrency=2, autoscale="30,2", pool_cls="threads",
                       without_heartbeat=True, without_mingle=True, without_gossip=True)
    assert app.conf.broker_transport_options["max_connections"] == 30 + HEADROOM
