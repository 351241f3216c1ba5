"""The live defaults of per-key tools: cached by each gate and passed to acquire.lua in ARGV.

Each value of such a tool's key argument keeps its keys under a hash tag of its own
(`{t|h}`), so no script can read one field for all of them on a Redis Cluster. `throttle
limits set TOOL` writes the tool's default into `<prefix>:limits:defaults` and bumps
`<prefix>:limits:version`; a gate checks the version when a decision of such a tool comes
more than `REFRESH_S` after its last check (one GET on that decision's path, not one per
decision) and reads its tools' fields of the hash (HMGET) only when the version moved. Every
decision thus uses a default at most `REFRESH_S` old, in every process, without a thread of
its own (prefork, threads, gevent and asyncio alike). Tiers and the defaults of other tools
are read by the script itself, in the same call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
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
        """Note a version read now; True when it differs from the one loaded (read the
        hash, then `load` with this version)."""
        self._checked_at = time.monotonic()
        return bool(version != self._version)

    @property
    def fields(self) -> list[str]:
        """The hash's fields to read (HMGET: its tools are known), one per tool."""
        return [f"tool:{name}" for name in sorted(self._tools)]

    def load(self, values: Sequence[Any], version: Any) -> None:
        """Take the values read at `fields` (encoded limits, or None) under `version`; bad
        values are skipped (the file's limits then stand, as in the script)."""
        built = {}
        for name, value in zip(sorted(self._tools), values, strict=True):
            limits = None if value is None else decode(_text(value))
            if limits is not None:
                built[name] = self._build(name, limits)
        self.built, self._version = built, version


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
