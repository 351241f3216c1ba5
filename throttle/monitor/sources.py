"""Where `throttle status`, `top` and `exporter` read: shared options and the clients they open.

Every option falls back to the environment the workers use (see workers/celery.py):
THROTTLE_REDIS_URL, THROTTLE_BROKER_URL, THROTTLE_PREFIX, THROTTLE_CONFIG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from redis.backoff import NoBackoff
from redis.retry import Retry

from throttle.config import Config
from throttle.config_file import default_config_path, load_config
from throttle.keys import DEFAULT_PREFIX, check_prefix
from throttle.monitor.queues import QueueDepths
from throttle.store import DEFAULT_REDIS_URL, StoreClient, connect, mask_url

SOCKET_TIMEOUT_S = 2.0

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Sources:
    """The gate's Redis, the broker and the tools file a monitoring command reads."""

    redis_url: str
    broker_url: str
    prefix: str
    config: Config

    def redis(self) -> StoreClient:
        return connect(
            self.redis_url, socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 1),
        )

    def queues(self) -> QueueDepths:
        return QueueDepths(self.broker_url)

    def describe(self) -> str:
        """Where it reads, with passwords masked."""
        return (f"redis {mask_url(self.redis_url)}, broker {mask_url(self.broker_url)}, "
                f"prefix {self.prefix!r}, config {self.config.source}")



def source_options(command: F) -> F:
    """Add --redis-url, --broker-url, --prefix and --config to a click command."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Tools file (default: THROTTLE_CONFIG, else config/tools.toml)."),
        click.option("--prefix", envvar="THROTTLE_PREFIX", default=DEFAULT_PREFIX,
                     show_default=True, help="The gate's key prefix [env THROTTLE_PREFIX]."),
        click.option("--broker-url", envvar="THROTTLE_BROKER_URL", metavar="URL",
                     help="The Celery broker (default: the Redis URL) "
                     "[env THROTTLE_BROKER_URL]."),
        click.option("--redis-url", envvar="THROTTLE_REDIS_URL", default=DEFAULT_REDIS_URL,
                     metavar="URL", show_default=True,
                     help="The gate's Redis [env THROTTLE_REDIS_URL]."),
    ]
    for option in options:
        command = option(command)
    return command


def resolve_sources(
    redis_url: str, broker_url: str | None, prefix: str, config_path: Path | None
) -> Sources:
    """The Sources of a command's options (raises ThrottleError for a bad config or prefix)."""
    config = load_config(config_path or default_config_path())
    return Sources(redis_url, broker_url or redis_url, check_prefix(prefix), config)
