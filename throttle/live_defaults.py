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
from collections.abc import Mapping
from typing import Any

from throttle.limit import Limit
from throttle.overrides import decode

REFRESH_S = 0.5


class LiveDefaults:
    """The last read of `<prefix>:limits:defaults`: tool name -> its live limits."""

    __slots__ = ("_checked_at", "_version", "limits")

    def __init__(self) -> None:
        self._checked_at = -math.inf
        self._version: Any = None
        self.limits: dict[str, tuple[Limit, ...]] = {}

    def due(self) -> bool:
        """Whether the version must be checked before the next decision."""
        return time.monotonic() - self._checked_at >= REFRESH_S

    def checked(self, version: Any) -> bool:
        """Note a version read now; True when it differs from the last (read the hash)."""
        self._checked_at = time.monotonic()
        changed = bool(version != self._version)
        self._version = version
        return changed

    def load(self, raw: Mapping[Any, Any]) -> None:
        """Take the hash's fields ('tool:<t>' -> encoded limits); bad values are skipped
        (the file's limits then stand, as in the script)."""
        found = {}
        for field, value in raw.items():
            name = _text(field).removeprefix("tool:")
            limits = decode(_text(value))
            if limits is not None:
                found[name] = limits
        self.limits = found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
