"""What the Celery side needs from the `Throttle` that owns it.

The task base class, the reaper, the revocation hooks, the bootsteps and the metrics take
an `Owner` rather than importing `throttle.routing`, so imports only point down: routing
builds on them, never the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from celery import Celery

    from throttle.config import Config
    from throttle.gate import Gate


class Owner(Protocol):
    """A `Throttle`, as the parts it owns see it."""

    app: Celery
    config: Config
    prefix: str
    register_calls: bool  # calls are registered for the reaper (Redis brokers only)
    trusts_redelivered: bool  # the broker, not the publisher, sets the redelivered flag

    @property
    def gate(self) -> Gate:
        """This process's gate."""

    def size_gate_pool(self, max_connections: int) -> None:
        """Bound the gate's connection pool."""

    def reload(self) -> Config:
        """Load the tools file again (on SIGHUP); raises ConfigError and keeps the old one."""
