"""Live limits: overrides of a tool's, a key value's (tier) or a pool's limits, in Redis.

The tools file stays the default. An override is written into the limits hash under the
decision's own hash tag (see throttle/keys.py), which acquire.lua reads in the same call that
decides: every worker, gateway and exporter enforces it from its next decision on, with no
restart and no extra round trip. Each change is also recorded in an index (who, when, which
version) for `throttle limits show`, `status` and the exporter.

Adaptive limits (throttle/adaptive.py) live in the same hash under fields of their own
('adaptive:<target>'), which acquire.lua min-combines with whatever limit stands here.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from throttle.config import Config, ToolConfig
from throttle.errors import ConfigError
from throttle.keys import (
    override_fields,
    overrides_index_key,
    overrides_key,
    overrides_version_key,
    pool_overrides_key,
    tags_per_key_value,
    tool_defaults_key,
)
from throttle.limit import Limit
from throttle.store import StoreClient

MAX_TIERS_PER_TOOL = 1000
MAX_KEY_TEXT = 200


@dataclass(frozen=True, slots=True)
class Override:
    """One live override: what it replaces, its limits, who set it, when and its version."""

    tool: str | None
    pool: str | None
    key: str | None
    limits: tuple[Limit, ...]
    set_by: str
    set_at_s: float
    version: int

    @property
    def target(self) -> str:
        """What it applies to, as `show` prints it: "search", "search --key acme", "pool llm"."""
        if self.pool is not None:
            return f"pool {self.pool}"
        return f"{self.tool} --key {self.key}" if self.key is not None else str(self.tool)

    @property
    def limits_text(self) -> str:
        return " ".join(str(limit) for limit in self.limits)


def default_setter() -> str:
    """`user@host` of the process setting an override."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def parse_limits(texts: Sequence[str]) -> tuple[Limit, ...]:
    """Limits from texts like "200/60s"; a ConfigError naming the bad one and the form."""
    if not texts:
        raise ConfigError("give at least one limit, e.g. '200/60s'")
    limits = []
    for text in texts:
        try:
            limits.append(Limit.parse(text))
        except ValueError as exc:
            raise ConfigError(f"limit {text!r}: {exc}") from None
    return tuple(limits)


def encode(limits: Sequence[Limit]) -> str:
    """The text acquire.lua parses: "max window_ms ..." pairs, "max d" for a daily quota."""
    return " ".join(f"{limit.max} {'d' if limit.calendar else limit.window_ms}"
                    for limit in limits)


def decode(text: str) -> tuple[Limit, ...] | None:
    """The limits of an `encode`d value; None for a value acquire.lua would not apply."""
    words = text.split()
    if not words or len(words) % 2:
        return None
    try:
        return tuple(Limit.parse(f"{m}/1d") if w == "d" else Limit.parse(f"{m}/{w}ms")
                     for m, w in zip(words[::2], words[1::2], strict=True))
    except ValueError:
        return None


def in_force(live: Sequence[Limit] | None, sliding: Sequence[Limit],
             quotas: Sequence[Limit]) -> tuple[tuple[Limit, ...], tuple[Limit, ...]]:
    """(sliding limits, daily quotas) in force: each kind the override gives replaces the
    file's of that kind; a kind it leaves out stays the file's."""
    live = live or ()
    live_sliding = tuple(limit for limit in live if not limit.calendar)
    live_quotas = tuple(limit for limit in live if limit.calendar)
    return live_sliding or tuple(sliding), live_quotas or tuple(quotas)


def _place(config: Config, prefix: str, tool: str | None, pool: str | None,
           key: str | None) -> tuple[str, str, str]:
    """(limits hash, field, index field) of an override; ConfigError when it cannot apply."""
    if pool is not None:
        if tool is not None or key is not None:
            raise ConfigError("give either a tool (with --key) or --pool NAME, not both")
        if pool not in config.pools:
            known = ", ".join(sorted(config.pools)) or "(none)"
            raise ConfigError(f"unknown pool {pool!r}; known pools: {known}")
        return pool_overrides_key(prefix, pool), "pool", f"pool:{pool}"
    if tool is None:
        raise ConfigError("name a tool (throttle limits set TOOL ...) or a pool (--pool NAME)")
    spec = config.tool(tool)
    if key is None:
        field = override_fields(tool)[0]
        if tags_per_key_value(spec):  # no script reads one key for all its key values
            return tool_defaults_key(prefix), field, field
        return overrides_key(prefix, spec), field, field
    return _tier_place(prefix, spec, key)


def _tier_place(prefix: str, spec: ToolConfig, key: str) -> tuple[str, str, str]:
    if spec.key is None:
        raise ConfigError(f"tool {spec.name!r} has no key argument; drop --key, or give it "
                          "`key = \"<argument>\"` in the tools file")
    if not key or len(key) > MAX_KEY_TEXT:
        raise ConfigError(f"--key must be 1-{MAX_KEY_TEXT} characters, got {len(key)}")
    field = override_fields(spec.name, key)[1]
    return overrides_key(prefix, spec, key), field, field


def set_override(
    client: StoreClient,
    config: Config,
    prefix: str,
    limits: Sequence[Limit],
    *,
    tool: str | None = None,
    pool: str | None = None,
    key: str | None = None,
    set_by: str | None = None,
) -> Override:
    """Replace the limits of `tool` (a tier of its `key` value) or `pool` from now on."""
    if not limits:
        raise ConfigError("give at least one limit, e.g. '200/60s'")
    hash_key, field, index_field = _place(config, prefix, tool, pool, key)
    index = overrides_index_key(prefix)
    if key is not None and not client.hexists(index, index_field):
        tiers = sum(1 for name in client.hkeys(index)
                    if _text(name).startswith(f"tier:{tool}:"))
        if tiers >= MAX_TIERS_PER_TOOL:
            raise ConfigError(f"tool {tool!r} has {tiers} tiers, the most allowed; reset some "
                              "with `throttle limits reset TOOL --key VALUE`")
    client.hset(hash_key, field, encode(limits))
    # Bumped after the write: a gate that sees the new version reads the new value.
    version = int(client.incr(overrides_version_key(prefix)))
    record = {"tool": tool, "pool": pool, "key": key, "limits": [str(x) for x in limits],
              "set_by": set_by or default_setter(), "set_at_s": time.time(), "version": version}
    client.hset(index, index_field, json.dumps(record))
    return _override(record)


def reset_override(
    client: StoreClient,
    config: Config,
    prefix: str,
    *,
    tool: str | None = None,
    pool: str | None = None,
    key: str | None = None,
) -> bool:
    """Go back to the file's limits for `tool` (tier `key`) or `pool`; False if none was set."""
    hash_key, field, index_field = _place(config, prefix, tool, pool, key)
    removed = int(client.hdel(hash_key, field))
    client.hdel(overrides_index_key(prefix), index_field)
    client.incr(overrides_version_key(prefix))
    return removed > 0


def read_overrides(client: StoreClient, prefix: str) -> list[Override]:
    """Every live override, ordered by what it applies to."""
    raw = client.hgetall(overrides_index_key(prefix))
    found = [_override(json.loads(_text(value))) for value in raw.values()]
    return sorted(found, key=lambda o: (o.pool or "", o.tool or "", o.key or ""))


def _override(record: dict[str, Any]) -> Override:
    return Override(
        tool=record["tool"], pool=record["pool"], key=record["key"],
        limits=tuple(Limit.parse(text) for text in record["limits"]),
        set_by=str(record["set_by"]), set_at_s=float(record["set_at_s"]),
        version=int(record["version"]),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
