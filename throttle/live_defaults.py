"""The live defaults of per-key tools: cached by each gate and passed to acquire.lua in ARGV.

Each value of such a tool's key argument keeps its keys under a hash tag of its own
(`{t|h}`), so no script can read one field for all of them on a Redis Cluster. `throttle
limits set TOOL` writes the tool's default into `<prefix>:limits:defaults` and bumps
`<prefix>:limits:version`; a gate checks the version when a decision of such a tool comes
more than `REFRESH_S` after its last check (one GET on that decision's path, not one per
decision) and reads the hash again only when the version moved. Every decision thus uses a
default at most `REFRESH_S` old, in every process, without a thread of its own (prefork,
threads, gevent and asyncio alike). Tiers and the defaults of other tools are read by the
script itself, in the same call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from throttle.limit import Limit
from throttle.overrides import decode

REFRESH_S = 0.5
T = TypeVar("T")


class LiveDefaults(Generic[T]):
    """The last read of `<prefix>:limits:defaults` for the per-key tools `tools`: what
    `build(tool, live limits)` makes of each default set live (the script's arguments)."""

    __slots__ = ("_build", "_checked_at", "_tools", "_version", "built")

    def __init__(self, tools: set[str], build: Callable[[str, tuple[Limit, ...]], T]) -> None:
        self._tools, self._build = tools, build
        self._checked_at = -math.inf
        self._version: Any = None
        self.built: dict[str, T] = {}

    def due(self, tool: str) -> bool:
        """Whether the version must be checked before `tool`'s next decision."""
        return tool in self._tools and time.monotonic() - self._checked_at >= REFRESH_S

    def checked(self, version: Any) -> bool:
        """Note a version read now; True when it differs from the last (read the hash)."""
        self._checked_at = time.monotonic()
        changed = bool(version != self._version)
        self._version = version
        return changed

    def load(self, raw: Mapping[Any, Any]) -> None:
        """Take the hash's fields ('tool:<t>' -> encoded limits); bad values are skipped
        (the file's limits then stand, as in the script)."""
        built = {}
        for field, value in raw.items():
            name = _text(field).removeprefix("tool:")
            limits = decode(_text(value))
            if limits is not None and name in self._tools:
                built[name] = self._build(name, limits)
        self.built = built


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
