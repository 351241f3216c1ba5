"""One gate serves every thread of a process through a bounded pool (real Redis)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from throttle import Action, Gate, load_config

pytestmark = pytest.mark.redis

CONFIG = {"tools": {"t": {"limits": ["30/60s"], "max_delay": "1h"}},
          "broker": {"visibility_timeout": "2h"}}


def test_many_threads_share_a_gate_of_two_connections_and_every_call_is_decided(
    redis_url: str, prefix: str
) -> None:
    gate = Gate(redis_url, load_config(CONFIG), prefix=prefix, max_connections=2)
    with ThreadPoolExecutor(max_workers=40) as threads:
        decisions = list(threads.map(lambda i: gate.acquire("t", f"m{i}"), range(200)))
    pool = gate.client.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool)
    opened = len(pool._connections)  # every connection the pool ever made
    print(f"\n200 calls from 40 threads: {opened} connections opened")
    assert opened <= 2
    actions = [decision.action for decision in decisions]
    assert actions.count(Action.ADMIT) == 30
    assert actions.count(Action.DELAY) == 170
