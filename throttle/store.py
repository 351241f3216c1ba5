"""Connecting to the gate's Redis: one server or a cluster, sync or asyncio, and its errors.

Everything that talks to the gate's Redis (the gate, status, the exporter, the gateway)
connects here, treats the same exceptions as a store failure, and shows URLs masked.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from throttle.errors import StoreUnavailable

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SOCKET_TIMEOUT_S = 2.0
# What a failing store raises (redis-py's cluster errors are not RedisErrors).
STORE_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# The clients the gate, the monitoring commands and the gateway work with.
StoreClient = redis.Redis | redis.cluster.RedisCluster
AsyncStoreClient = redis.asyncio.Redis | redis.asyncio.RedisCluster


def mask_url(url: str) -> str:
    """`url` with any password (in the netloc or the query) replaced by '***'."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = [
            (name, "***" if name.lower() == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def _cluster_url(url: str) -> str | None:
    """The node URL in a `redis+cluster://` (or `rediss+cluster://`) URL, else None."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.removesuffix('+cluster')}://{rest}" if scheme in CLUSTER_SCHEMES else None


def connect(url: str, *, max_connections: int | None = None, **options: Any) -> StoreClient:
    """A client for the gate's Redis. `redis+cluster://host:port` (or `rediss+cluster://`)
    reaches a Redis Cluster through that node; any other URL is one server.

    A single server is connected on first use; a cluster client asks the node for the
    cluster's layout at once, and raises one of STORE_ERRORS if it does not answer.
    `max_connections` bounds a single server's pool: a call past it waits for a free
    connection (at most `socket_connect_timeout`) instead of opening one more.
    """
    node = _cluster_url(url)
    if node is not None:
        return redis.cluster.RedisCluster.from_url(node, **options)
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections,
        timeout=options.get("socket_connect_timeout") or DEFAULT_SOCKET_TIMEOUT_S, **options,
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as from_url: closing the client closes it
    return client


def connect_async(url: str, **options: Any) -> AsyncStoreClient:
    """`connect` for asyncio clients."""
    node = _cluster_url(url)
    if node is not None:
        return redis.asyncio.RedisCluster.from_url(node, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def client_options(socket_timeout_s: float, *, asyncio: bool = False) -> dict[str, Any]:
    """The gate's client settings: retry once on a dropped connection (a restarted server),
    never on a timeout, so a call that times out raises within the socket timeout."""
    retry_class = redis.asyncio.retry.Retry if asyncio else Retry
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": retry_class(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "health_check_interval": 30,
    }


def unreachable(url: str, exc: BaseException) -> StoreUnavailable:
    """The `StoreUnavailable` for a failure of the store at (masked) `url`."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return StoreUnavailable(
            f"the gate's Redis at {url} is out of memory (used memory is above maxmemory and "
            "nothing may be evicted) and refuses to write; raise its maxmemory or free memory. "
            "Until then each tool's on_store_error applies",
            url,
        )
    return StoreUnavailable(
        f"the gate's Redis at {url} failed: {type(exc).__name__}: {exc}; check that "
        "Redis runs and that THROTTLE_REDIS_URL points at it",
        url,
    )


def describe_client(client: Any) -> str:
    """A URL-like name of a client made elsewhere (never its password)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    if "host" in kwargs:
        scheme = "rediss" if kwargs.get("ssl") else "redis"
        return f"{scheme}://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return type(client).__name__


class StoreErrors:
    """`with errors:` turns any of STORE_ERRORS raised inside into `StoreUnavailable`."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: TracebackType | None
    ) -> None:
        if exc is not None and isinstance(exc, STORE_ERRORS):
            raise unreachable(self.url, exc) from exc
