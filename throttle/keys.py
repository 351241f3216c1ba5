"""Every Redis key throttle uses, built in one place.

Layout, for a tool `t` (and, for per-key limits, the hashed value `h` of its key argument)::

    <prefix>:{t}:log       ZSET  member = task id, score = admission or reserved slot (ms)
    <prefix>:{t}:rsv       ZSET  members holding a reservation not yet admitted, score = slot
    <prefix>:{t}:cost      HASH  member -> units, only for members costing more or less than 1
    <prefix>:{t}:redelivered:<task id>   STRING  deliveries after admission (worker lost)
    <prefix>:{t|h}:...     the same per key value

All keys of one decision share the `{...}` hash tag, so a decision stays on one Redis Cluster
shard. Values taken from task arguments are hashed and length-bounded: no argument can reach
another tool's or tenant's keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from throttle.errors import ConfigError

DEFAULT_PREFIX = "throttle"
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is a safe key prefix, else raise ConfigError saying why."""
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"key prefix {prefix!r} is invalid; use 1-64 letters, digits, '_', '.', ':' or '-' "
            "(no braces: they would break the hash tag)"
        )
    return prefix


def hash_key_value(value: Any) -> str:
    """A short, fixed-length digest of a key argument's value (any JSON value).

    The type is hashed too, so 1, "1" and b"1" are different keys.
    """
    if isinstance(value, str):
        raw = b"s:" + value.encode("utf-8", "surrogatepass")
    elif isinstance(value, bytes):
        raw = b"b:" + value
    else:
        raw = b"j:" + json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolKeys:
    """The keys of one tool (and key value) for one gate decision."""

    log: str
    rsv: str
    cost: str

    def as_list(self) -> list[str]:
        """Keys in the order every script expects them (KEYS[1..3])."""
        return [self.log, self.rsv, self.cost]


def tool_keys(prefix: str, tool: str, key_value: Any = None) -> ToolKeys:
    """Keys for `tool`, optionally scoped to one value of its key argument."""
    tag = tool if key_value is None else f"{tool}|{hash_key_value(key_value)}"
    base = f"{prefix}:{{{tag}}}"
    return ToolKeys(log=f"{base}:log", rsv=f"{base}:rsv", cost=f"{base}:cost")


def redelivery_key(prefix: str, tool: str, member: str, key_value: Any = None) -> str:
    """The counter of a task's redeliveries after its admission (its worker was lost)."""
    return tool_keys(prefix, tool, key_value).log.removesuffix(":log") + f":redelivered:{member}"
