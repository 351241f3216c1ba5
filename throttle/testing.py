"""Test your own throttled tools with Celery's in-process worker, on the embedded gate.

A pytest plugin on top of the `celery_app` fixture that pytest-celery (`celery.contrib.pytest`)
provides. Enable it in a `conftest.py` with `pytest_plugins = ["throttle.testing"]`, then
override `throttle_config` (your tools config) and `throttle_tools` (register your tools on
the `throttle` fixture); `throttle_worker` runs an in-process worker that serves them:

    @pytest.fixture
    def throttle_tools(throttle):
        return {"search_products": throttle.tool(search_products)}

    def test_a_burst_is_smoothed(throttle_tools, throttle_worker): ...

The gate runs the same Lua scripts on fakeredis (the embedded gate) unless
`throttle_redis_url` (default: the THROTTLE_TEST_REDIS_URL environment variable) names a real
Redis; each test gets a key prefix of its own, whose keys are deleted afterwards.
"""

from __future__ import annotations

from throttle.extras import require_extra

require_extra("testing", "throttle.testing")

import os  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import fakeredis  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from celery import Celery  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402

from throttle.config import Config  # noqa: E402
from throttle.errors import ConfigError  # noqa: E402
from throttle.routing import Throttle  # noqa: E402
from throttle.store import StoreClient  # noqa: E402

REDIS_URL_ENV = "THROTTLE_TEST_REDIS_URL"
MEMORY_POLLING_S = 0.01  # the memory transport polls every second by default

__all__ = [
    "embedded_throttle",
    "throttle",
    "throttle_config",
    "throttle_redis_url",
    "throttle_store",
    "throttle_tools",
    "throttle_worker",
]


def embedded_throttle(
    app: Celery, config: Config | str | Path, *, store: StoreClient | None = None,
    prefix: str | None = None,
) -> Throttle:
    """A `Throttle` for `app` whose gate runs on `store` (default: a new fakeredis).

    With Celery's in-memory broker, its polling is made fast enough for delays to be seen.
    """
    if str(app.conf.broker_url or "").startswith("memory"):
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("polling_interval", MEMORY_POLLING_S)
        app.conf.broker_transport_options = options
    return Throttle(
        app, config, redis_client=store if store is not None else fakeredis.FakeRedis(),
        prefix=prefix or f"throttle-test-{uuid.uuid4().hex[:12]}",
    )


@pytest.fixture
def throttle_config() -> Config | str | Path:
    """Your tools config (a path or a `Config`); override it. Default: config/tools.toml."""
    path = Path("config/tools.toml")
    if not path.exists():
        raise ConfigError(
            "throttle.testing: no config/tools.toml here; override the `throttle_config` "
            "fixture to return your tools config (a path or a throttle.Config)"
        )
    return path


@pytest.fixture
def throttle_redis_url() -> str | None:
    """A real Redis for the gate, or None for the embedded gate (fakeredis running the Lua)."""
    return os.environ.get(REDIS_URL_ENV) or None


@pytest.fixture
def throttle_store(throttle_redis_url: str | None) -> Iterator[StoreClient]:
    """The gate's store: fakeredis, or a client of `throttle_redis_url`."""
    if throttle_redis_url is None:
        store: Any = fakeredis.FakeRedis()
    else:
        store = redis.Redis.from_url(throttle_redis_url)
    yield store
    store.close()


@pytest.fixture
def throttle(
    celery_app: Celery, throttle_config: Config | str | Path, throttle_store: Any
) -> Iterator[Throttle]:
    """A `Throttle` on pytest-celery's `celery_app`, its keys under a prefix of this test's."""
    instance = embedded_throttle(celery_app, throttle_config, store=throttle_store)
    yield instance
    keys = list(throttle_store.scan_iter(match=f"{instance.prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        throttle_store.delete(*keys[start : start + 500])


@pytest.fixture
def throttle_tools(throttle: Throttle) -> dict[str, Any]:
    """Register your tools on `throttle` here (override it); name -> task."""
    return {}


@pytest.fixture
def throttle_worker(
    celery_app: Celery, throttle_tools: dict[str, Any], celery_worker_pool: str,
    celery_worker_parameters: dict[str, Any],
) -> Iterator[Any]:
    """Celery's in-process worker, started once `throttle_tools` are registered.

    It serves every tool queue and the default queue; configure it with pytest-celery's
    `celery_worker_pool` and `celery_worker_parameters` fixtures.
    """
    with start_worker(celery_app, pool=celery_worker_pool, **celery_worker_parameters) as worker:
        yield worker
