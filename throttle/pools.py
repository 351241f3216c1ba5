"""Connection pools sized for the worker's concurrency, on every Celery pool.

A node runs up to `concurrency` calls at once in one process on `-P threads`, `gevent` or
`eventlet`; each may ask the gate, re-publish its delay and ack its message at the same
moment. kombu's Redis channel opens at most `max_connections` (default 10) connections and
raises MaxConnectionsError past them. Under `-P gevent -c 50` acks failed ("Couldn't ack"),
the consumer took the error for a lost broker and reconnected, closing sockets that other
greenlets were reading ("File descriptor was closed in another greenlet"), and the unacked
calls ran again after the visibility timeout.

`size_pools` raises each limit the user left at its default to the node's concurrency plus
head-room for the consumer's own connections, and says how to fix one the user set too low.
"""

from __future__ import annotations

from typing import Any

from celery.app.defaults import DEFAULTS

# Connections a node uses beside its calls: the consumer's deliveries and restores, the
# reaper, the metrics flusher, pidbox and events.
HEADROOM = 10
REDIS_PY_MAX_CONNECTIONS = 100  # what a redis-py pool opens at most when given None


def connections_for(concurrency: int) -> int:
    """Connections one process may need at once when it runs `concurrency` calls."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
    return concurrency + HEADROOM


def size_pools(conf: Any, concurrency: int, *, redis_broker: bool) -> list[str]:
    """Size the broker's, the producers' and the result backend's pools for `concurrency`.

    Settings the user changed from Celery's default are kept; the returned messages say
    which of them are too small and how to fix them.
    """
    needed = connections_for(concurrency)
    problems: list[str] = []
    if redis_broker:
        options = dict(conf.broker_transport_options or {})
        chosen = options.setdefault("max_connections", needed)
        if (chosen or REDIS_PY_MAX_CONNECTIONS) < needed:
            shown = chosen or f"{chosen} (redis-py: {REDIS_PY_MAX_CONNECTIONS})"
            problems.append(
                f"broker_transport_options['max_connections'] = {shown} is below the "
                f"{needed} connections a node of concurrency {concurrency} may use at once: "
                f"acks fail with MaxConnectionsError; raise it to {needed} or remove it"
            )
        conf.broker_transport_options = options
    limit = conf.broker_pool_limit
    if limit == DEFAULTS["broker_pool_limit"]:
        conf.broker_pool_limit = max(limit, needed)
    elif limit and limit < concurrency:
        problems.append(
            f"broker_pool_limit = {limit} is below the worker's concurrency ({concurrency}): "
            f"delayed calls wait for a producer; raise it to {needed} or remove it"
        )
    backend_limit = conf.get("redis_max_connections")
    if backend_limit is None:  # Celery's default: redis-py then opens at most 100
        conf.redis_max_connections = max(REDIS_PY_MAX_CONNECTIONS, needed)
    elif backend_limit < needed:
        problems.append(
            f"redis_max_connections = {backend_limit} is below the {needed} connections a "
            f"node of concurrency {concurrency} may use at once: storing results fails with "
            f"MaxConnectionsError; raise it to {needed} or remove it"
        )
    return problems
