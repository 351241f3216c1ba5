"""Fair sharing of a tool's (or pool's) limits among the values of one argument (tenants).

A tool or pool with `fair_by = "<argument>"` groups its calls by that argument's value; the
limits stay shared and exact, and acquire.lua orders the calls that wait by start-time fair
queueing (docs/gate.md, "Fair sharing"). `fair_weights` gives a tenant a larger share;
`fair_horizon` is how far ahead exact reservations are made (default: half the longest
window); calls beyond it are parked: told when to come back, keeping their place.

`set_live_weight` changes a tenant's weight at run time (read by acquire.lua in the same
call, like live limits): it applies to the tenant's calls from their next new arrival on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from throttle.config import Config, ToolConfig
from throttle.errors import ConfigError
from throttle.keys import DEFAULT_PREFIX, fair_keys, hash_key_value, keys_for
from throttle.store import StoreClient


@dataclass(frozen=True, slots=True)
class Fairness:
    """How one tool's calls share its limits: by which argument, where, with what weights."""

    by: str
    weights: dict[str, float]
    horizon_ms: float
    pool: str | None  # the pool whose tools share one fair queue (None: the tool's own)

    def weight(self, tenant: Any) -> float:
        """The tenant's weight (1 unless `fair_weights` names it; non-strings as JSON)."""
        name = tenant if isinstance(tenant, str) else json.dumps(tenant, sort_keys=True)
        return self.weights.get(name, 1.0)

    @staticmethod
    def tenant_id(tenant: Any) -> str:
        """The tenant as acquire.lua stores it: a fixed-length digest, never the value."""
        return hash_key_value(tenant)


def fairness_of(config: Config, tool: ToolConfig) -> Fairness | None:
    """The tool's fair sharing (its pool's when the pool sets `fair_by`), or None."""
    pool = config.pools[tool.pool] if tool.pool else None
    if pool is not None and pool.fair_by is not None:
        horizon = pool.fair_horizon_ms or _default_horizon_ms(
            max(limit.window_ms for limit in pool.limits))
        return Fairness(pool.fair_by, dict(pool.fair_weights), horizon, pool.name)
    if tool.fair_by is None:
        return None
    horizon = tool.fair_horizon_ms or _default_horizon_ms(tool.longest_window_ms)
    return Fairness(tool.fair_by, dict(tool.fair_weights), horizon, None)


def _default_horizon_ms(longest_window_ms: int) -> float:
    return longest_window_ms / 2


def live_weights_key(config: Config, tool: str, key: Any = None,
                     prefix: str = DEFAULT_PREFIX) -> str:
    """The hash of live weights acquire.lua reads for `tool` (its pool's, for a fair pool)."""
    spec = config.tool(tool)
    fair = fairness_of(config, spec)
    if fair is None:
        raise ConfigError(f"tool {tool!r} is not shared fairly; give it (or its pool) "
                          "`fair_by = \"<argument>\"` in the tools file")
    if spec.key is not None and key is None and fair.pool is None:
        raise ConfigError(f"tool {tool!r} keeps its windows per {spec.key!r} value: pass "
                          "key=<the value> whose tenants' weight to set")
    return fair_keys(keys_for(prefix, spec, key if spec.key else None), fair.pool, prefix)[5]


def set_live_weight(client: StoreClient, config: Config, tool: str, tenant: Any,
                    weight: float, *, key: Any = None, prefix: str = DEFAULT_PREFIX) -> None:
    """Give `tenant` `weight` shares of `tool` (of its pool, for a fair pool) from its next
    call on, on every worker; it wins over `fair_weights` in the file."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
            0 < weight <= 1_000_000_000):
        raise ConfigError(f"a weight must be a positive number up to 1,000,000,000, "
                          f"got {weight!r}")
    client.hset(live_weights_key(config, tool, key, prefix), Fairness.tenant_id(tenant),
                repr(float(weight)))


def reset_live_weight(client: StoreClient, config: Config, tool: str, tenant: Any, *,
                      key: Any = None, prefix: str = DEFAULT_PREFIX) -> bool:
    """Go back to the file's weight for `tenant`; False if none was set."""
    return bool(client.hdel(live_weights_key(config, tool, key, prefix),
                            Fairness.tenant_id(tenant)))
