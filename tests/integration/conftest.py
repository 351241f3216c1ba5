"""Fixtures for tests that run real Celery workers against the real Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.workers import Cluster, clean_db, cluster


def owned_dbs() -> tuple[int, int]:
    """The broker's and the result backend's database numbers, which these tests own.

    THROTTLE_TEST_DBS="11,12" moves them from 9,10 (two test sessions side by side on one
    server); under pytest-xdist, worker gwN takes the pair 2N numbers further up.
    """
    broker, backend = (int(n) for n in os.environ.get("THROTTLE_TEST_DBS", "9,10").split(","))
    step = 2 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    if max(broker, backend) + step > 12:  # 13 and 14 belong to tests/unit, 15 is spare
        raise pytest.UsageError(
            f"pytest-xdist worker gw{step // 2} would take databases {broker + step},"
            f"{backend + step}, past 12: run at most 2 workers (-n 2) or set THROTTLE_TEST_DBS")
    return broker + step, backend + step


BROKER_DB, BACKEND_DB = owned_dbs()


def with_db(url: str, db: int) -> str:
    """`url` pointing at database number `db`."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@pytest.fixture
def redis_dbs(redis_url: str) -> Iterator[tuple[str, str]]:
    """Broker and result-backend URLs on database numbers these tests own, emptied around."""
    urls = with_db(redis_url, BROKER_DB), with_db(redis_url, BACKEND_DB)
    for url in urls:
        clean_db(url)
    yield urls
    for url in urls:
        clean_db(url)


@pytest.fixture
def make_cluster(
    tmp_path: Path, redis_url: str, prefix: str, redis_dbs: tuple[str, str]
) -> Iterator[Any]:
    """Call with a tools config (and optional broker URL / env) to get a worker Cluster."""
    stack: list[Any] = []

    def make(config: dict[str, Any], *, broker_url: str | None = None, **kw: Any) -> Cluster:
        manager = cluster(
            tmp_path, redis_url=redis_url, prefix=prefix, config=config,
            broker_url=broker_url or redis_dbs[0], backend_url=redis_dbs[1], **kw,
        )
        stack.append(manager)
        return manager.__enter__()

    yield make
    for manager in reversed(stack):
        manager.__exit__(None, None, None)
