"""Celery worker pools the fault tests run on: `-P` and a concurrency that fits each."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class WorkerPool:
    """One `celery worker -P <name> -c <concurrency>` setup."""

    name: str
    concurrency: int

    @property
    def extra(self) -> list[str]:
        """The worker options that select this pool."""
        return ["-P", self.name]


PREFORK = WorkerPool("prefork", 2)
# Above kombu's 10 connections per channel, so pool sizing matters, yet light on 2 cores.
GEVENT = WorkerPool("gevent", 20)


def missing(pool: str) -> bool:
    """Whether `-P pool` needs a package that is not installed (gevent, eventlet)."""
    return pool in ("gevent", "eventlet") and importlib.util.find_spec(pool) is None


def pool_params(*pools: WorkerPool) -> list[object]:
    """`pools` as pytest params named by pool, skipped where the pool's package is absent."""
    return [
        pytest.param(
            pool, id=pool.name,
            marks=pytest.mark.skipif(
                missing(pool.name),
                reason=f"{pool.name} is not installed (pip install 'throttle[{pool.name}]')",
            ),
        )
        for pool in pools
    ]
