"""Fault tests run on a redis-server of their own: they flush scripts, cut links and fill
memory, which must not touch anybody else's data on a shared server.

`redis_url` points at that private server (db 0), so `redis_client`, `prefix`, `redis_dbs`
and `make_cluster` (reused from the integration tests) all use it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import make_cluster, redis_dbs  # noqa: F401  (fixtures)
from tests.support.servers import RedisServer, private_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server on a free loopback port, for this test alone."""
    with private_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The private server's database 0 (overrides the shared server's URL)."""
    return redis_server.url(0)
