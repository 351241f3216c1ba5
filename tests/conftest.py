"""Shared fixtures: the real Redis every test talks to, under a key prefix of its own."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import settings

from throttle import registrar
from throttle.monitor import metrics
from throttle.scripts import LuaScript

# Hypothesis: one policy for every property test. The normal run ("fixed") replays the same
# examples every time (derandomize), so a red build is never a roll of the dice; `make
# test-deep` selects "deep" and runs the property tests under many random seeds (each printed,
# so a failure replays with `--hypothesis-seed=N`). Tests set only max_examples and deadline.
settings.register_profile("fixed", derandomize=True, print_blob=True)
settings.register_profile("deep", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("THROTTLE_HYPOTHESIS_PROFILE", "fixed"))

REDIS_URL = os.environ.get("THROTTLE_REDIS_URL", "redis://127.0.0.1:6379/0")

# pytest-xdist gives its workers COLUMNS (the controller's width); the commands' output to a
# pipe is then as narrow as that instead of the width they choose: tests see a plain run's env.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.pop("COLUMNS", None)


@pytest.fixture(scope="session", autouse=True)
def _function_library_removed() -> Iterator[None]:
    """The gate's function library (acquire.lua, loaded by FCALL's first caller) leaves the
    shared server with the session, as the tests' keys do (a gate still deciding loads it
    again)."""
    yield
    function = LuaScript("acquire").function
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    with contextlib.suppress(redis.RedisError):  # (not loaded; no server: nothing to remove)
        client.function_delete((function or b"").decode())
    client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis the tests use (`make test` makes sure it answers)."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.exit(f"Redis does not answer at {REDIS_URL} ({exc}); run the tests with `make test`")
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"throttle-test-{uuid.uuid4().hex[:12]}"
    yield name
    metrics.flush()  # counts of calls made in this process land before the keys go
    registrar.flush_all()  # and so do the registrations of its `.delay()` calls
    delete_prefix(redis_client, name)


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under `prefix` (never FLUSHALL: the server is shared)."""
    batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(batch), 500):
        client.delete(*batch[start : start + 500])


# The test kit users get (throttle/testing.py), on pytest-celery's in-process fixtures.
pytest_plugins = ["throttle.testing"]
