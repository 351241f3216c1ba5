"""Every Redis key throttle uses, built in one place.

Layout, for a tool `t` (and, for per-key limits, the hashed value `h` of its key argument)::

    <prefix>:{t}:log       ZSET  member = task id, score = admission or reserved slot (ms)
    <prefix>:{t}:adm       ZSET  while the log may hold reservations: every admission in
                                 it (score = admission time, ms) and '' at +inf; a log
                                 entry not in it is then a reservation, stored only in the log
    <prefix>:{t}:cost      HASH  member -> units, only for members costing more or less than 1
    <prefix>:{t}:cooldown  STRING  until when (ms) the upstream asked for no calls
    <prefix>:{t}:free      ZSET  slots given back by released (revoked) reservations, member =
                                 '<units>:<task id>', score = slot (ms), for the next new calls
    <prefix>:{t}:calls     ZSET  calls enqueued and not yet admitted or refused, score = when
                                 to count one as lost (ms); see throttle/recovery.py
    <prefix>:{t}:calls:msg HASH  task id -> the call's arguments and headers (to re-publish)
    <prefix>:{t}:calls:decided  ZSET  calls the gate decided before their registration
                                 arrived, score = until when (ms) a late one is dropped
    <prefix>:{t}:redelivered:<task id>   STRING  deliveries after admission (worker lost)
    <prefix>:{t}:receipts  HASH  task id -> the receipt of the delivery the gate admitted
    <prefix>:{t|h}:...     the same per key value

A tool in a pool `p` lives under the pool's tag, beside the pool's own log::

    <prefix>:{p}:tool:<t>[|h]:log, :adm, :cost, :free    the tool's keys
    <prefix>:{p}:pool:log  ZSET  admissions of every tool in the pool, score = time (ms)
    <prefix>:{p}:pool:cost HASH  member -> units, for members whose cost is not 1
    <prefix>:{p}:tool:<t>:leases  ZSET  running calls of a capped tool, score = lease end
    <prefix>:{p}:pool:cooldown    STRING  until when (ms) no tool of the pool may call
    <prefix>:{p}:tool:<t>:calls, :calls:msg, :calls:decided   the tool's registry

A tool with a concurrency cap and no pool keeps its leases at <prefix>:{t}:leases, and its
per-key logs at <prefix>:{t}|h:... under the same tag.

Live limits (throttle/overrides.py), read by acquire.lua in the same call, under the
decision's own tag::

    <prefix>:{t}:limits     HASH  'tool:<t>' -> the tool's override, 'tier:<t>:<h>' -> a
                                  key value's tier ("max window_ms ..." pairs)
    <prefix>:{p}:limits     HASH  the same for the tools of pool `p`, and 'pool' -> the pool's
    <prefix>:{t|h}:limits   HASH  'tier:<t>:<h>' for a tool whose key values have tags of
                                  their own
        and, for an `adaptive` tool or pool (throttle/adaptive.py, written by adapt.lua):
        'adaptive:tool:<t>', 'adaptive:pool'   "until_ms max window_ms ..." that acquire.lua
                                  adds beside the standing limits (the lower binds)
        'adaptive-state:tool:<t>', 'adaptive-state:pool'   JSON: configured and effective
                                  max, why and when it moved (for status and the exporter)
    <prefix>:{t}:quota      HASH  '<i>:<day start ms>' -> units of daily quota i used that
                                  day (throttle/quotas.py); per key value, beside its log
    <prefix>:{p}:pool:quota HASH  the same for the daily quotas of pool `p` (all its tools)
    <prefix>:limits:defaults HASH 'tool:<t>' -> the override of a tool whose key values have
                                  tags of their own (no script can read one key for all its
                                  values): the gates cache it and pass it in ARGV
    <prefix>:limits:index   HASH  field -> who set which override when (JSON), for `show`
    <prefix>:limits:version STRING  bumped on every change

Fair sharing (throttle/fairness.py; `fair_by` on a tool, or on a pool for all its tools),
under the decision's tag, beside the tool's log (`<prefix>:{p}:pool:fair:...` for a pool)::

    <base>:fair:finish  ZSET  tenant digest -> its virtual finish tag (only tenants ahead
                              of the virtual clock: idle tenants have no entry)
    <base>:fair:queue   ZSET  waiting (parked) task id -> its virtual start tag
    <base>:fair:parked  ZSET  task id -> by when it must come back (ms), else it is dropped
    <base>:fair:cost    HASH  task id -> units, for waiting calls whose cost is not 1
    <base>:fair:clock   STRING  the virtual clock: the tag of the latest call given a slot
    <base>:fair:weights HASH  tenant digest -> weight set at run time (no TTL; fairness.py)

Counters for monitoring (written by the workers' metrics, never by a gate script)::

    <prefix>:stats:{t}           HASH  field -> running total (see throttle/monitor/stats.py)
    <prefix>:stats:{t}:<epoch s> HASH  the same fields for one 10 s bucket, expiring soon
    <prefix>:stats:{t}:limits    STRING  the limits the tool's workers enforce ("100/1m")
    <prefix>:stats:{t}:tenants:<epoch s>  HASH  a fair tool's admitted calls and waits per
                                 tenant for one 10 s bucket (throttle/monitor/tenants.py)
    <prefix>:stats:{t}:waiting:<reason>  ZSET  calls held with an ETA, member = task id,
                                 score = ETA (ms); see throttle/monitor/waiting.py

All keys of one decision share the `{...}` hash tag, so a decision stays on one Redis Cluster
shard. Values taken from task arguments are hashed and length-bounded: no argument can reach
another tool's or tenant's keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from throttle.errors import ConfigError

if TYPE_CHECKING:
    from throttle.config import ToolConfig

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
    adm: str
    cost: str
    pool_log: str | None = None
    pool_cost: str | None = None
    leases: str | None = None
    cooldown: str = ""
    free: str = ""

    def as_list(self) -> list[str]:
        """Keys in the order acquire.lua expects them: log, adm, cost[, pool log, pool cost]
        [, leases], cooldown."""
        keys = [self.log, self.adm, self.cost]
        if self.pool_log and self.pool_cost:
            keys += [self.pool_log, self.pool_cost]
        if self.leases:
            keys.append(self.leases)
        keys.append(self.cooldown)
        return keys


def reserved_in(log: Iterable[tuple[bytes, float]], admitted: Iterable[bytes]
                ) -> dict[bytes, float]:
    """Member -> slot of the reservations in a tool's `log` (ZRANGE WITHSCORES), given
    `admitted`, its adm set's members: the log's entries not named there, when adm exists
    (an empty `admitted`: no adm, every entry an admission)."""
    taken = set(admitted)
    if not taken:
        return {}
    return {member: slot for member, slot in log if member not in taken}


def tool_keys(
    prefix: str,
    tool: str,
    key_value: Any = None,
    *,
    pool: str | None = None,
    concurrency: bool = False,
) -> ToolKeys:
    """Keys for `tool`, optionally scoped to one value of its key argument.

    A tool in a pool shares the pool's hash tag; a tool with a concurrency cap keeps one
    tag for all its key values (the cap is per tool); otherwise each key value has its own.
    """
    digest = None if key_value is None else hash_key_value(key_value)
    if pool is None and not concurrency:
        tag = tool if digest is None else f"{tool}|{digest}"
        base = f"{prefix}:{{{tag}}}"
        return ToolKeys(
            log=f"{base}:log", adm=f"{base}:adm", cost=f"{base}:cost",
            cooldown=f"{base}:cooldown", free=f"{base}:free",
        )
    head = f"{prefix}:{{{pool}}}:tool:{tool}" if pool else f"{prefix}:{{{tool}}}"
    base = head if digest is None else f"{head}|{digest}"
    return ToolKeys(
        log=f"{base}:log",
        adm=f"{base}:adm",
        cost=f"{base}:cost",
        pool_log=f"{prefix}:{{{pool}}}:pool:log" if pool else None,
        pool_cost=f"{prefix}:{{{pool}}}:pool:cost" if pool else None,
        leases=f"{head}:leases" if concurrency else None,
        cooldown=f"{prefix}:{{{pool}}}:pool:cooldown" if pool else f"{base}:cooldown",
        free=f"{base}:free",
    )


def keys_for(prefix: str, tool: ToolConfig, key_value: Any = None) -> ToolKeys:
    """`tool_keys` for a configured tool: its pool and concurrency cap decide the layout."""
    return tool_keys(prefix, tool.name, key_value, pool=tool.pool,
                     concurrency=tool.concurrency is not None)


def tags_per_key_value(tool: ToolConfig) -> bool:
    """Whether each value of `tool`'s key argument has a hash tag of its own (`{t|h}`)."""
    return tool.key is not None and tool.pool is None and tool.concurrency is None


def overrides_key(prefix: str, tool: ToolConfig, key_value: Any = None) -> str:
    """The hash of live limits acquire.lua reads for `tool` (and key value): its tag's."""
    if tool.pool:
        return f"{prefix}:{{{tool.pool}}}:limits"
    if tool.key is None or tool.concurrency is not None or key_value is None:
        return f"{prefix}:{{{tool.name}}}:limits"
    return f"{prefix}:{{{tool.name}|{hash_key_value(key_value)}}}:limits"


def pool_overrides_key(prefix: str, pool: str) -> str:
    """The hash holding the live limits of pool `pool` (and of its tools)."""
    return f"{prefix}:{{{pool}}}:limits"


def override_fields(tool: str, key_value: Any = None) -> tuple[str, str]:
    """The fields of a tool's override and of a key value's tier ('' when no key value)."""
    tier = "" if key_value is None else f"tier:{tool}:{hash_key_value(key_value)}"
    return f"tool:{tool}", tier


def adaptive_fields(target: str) -> tuple[str, str]:
    """The fields of a learned limit and of its state; `target` is 'pool' or 'tool:<t>'."""
    return f"adaptive:{target}", f"adaptive-state:{target}"


def overrides_index_key(prefix: str) -> str:
    """Every live override with who set it and when (for `throttle limits show`, `status`)."""
    return f"{prefix}:limits:index"


def tool_defaults_key(prefix: str) -> str:
    """The overrides of per-key tools' defaults, read by the gates' cache, not by a script."""
    return f"{prefix}:limits:defaults"


def overrides_version_key(prefix: str) -> str:
    """A counter bumped on every change of a live limit."""
    return f"{prefix}:limits:version"


def cooldown_left_s(pttl: Any) -> float:
    """Seconds left in a cooldown, from its key's PTTL (negative when there is none)."""
    return max(0, int(pttl)) / 1000


def registry_keys(prefix: str, tool: str, pool: str | None = None) -> tuple[str, str]:
    """The registry of `tool`'s undecided calls: (ZSET of ids by check time, HASH of messages).

    One per tool, under the tool's tag (the pool's for a pooled tool), whatever its key.
    """
    head = f"{prefix}:{{{pool}}}:tool:{tool}" if pool else f"{prefix}:{{{tool}}}"
    return f"{head}:calls", f"{head}:calls:msg"


def decided_key(prefix: str, tool: str, pool: str | None = None) -> str:
    """The calls of `tool` the gate decided before their registration arrived (a ZSET of
    ids by when a late registration stops being dropped), beside its registry."""
    return f"{registry_keys(prefix, tool, pool)[0]}:decided"


def redelivery_key(keys: ToolKeys, member: str) -> str:
    """The counter of a task's redeliveries after its admission (its worker was lost)."""
    return keys.log.removesuffix(":log") + f":redelivered:{member}"


def receipts_key(log: str) -> str:
    """The receipts of admitted deliveries, beside the log `log` (same hash tag)."""
    return log.removesuffix(":log") + ":receipts"


def quota_key(keys: ToolKeys) -> str:
    """The hash of a tool's (and key value's) daily quota use: '<i>:<day start ms>' -> units."""
    return keys.log.removesuffix(":log") + ":quota"


def pool_quota_key(prefix: str, pool: str) -> str:
    """The hash of pool `pool`'s daily quota use, charged by every tool of the pool."""
    return f"{prefix}:{{{pool}}}:pool:quota"


FAIR_PARTS = ("finish", "queue", "parked", "cost", "clock", "weights")


def fair_keys(keys: ToolKeys, pool: str | None = None, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The fair-sharing keys acquire.lua takes, in its order: beside the tool's log (`keys`),
    or the pool's own when the pool shares by tenant."""
    base = f"{prefix}:{{{pool}}}:pool" if pool else keys.log.removesuffix(":log")
    return [f"{base}:fair:{part}" for part in FAIR_PARTS]


def stats_key(prefix: str, tool: str) -> str:
    """The hash of `tool`'s running totals (decisions, delays, body durations, store errors).

    `stats` stands where gate keys have their `{tag}`, so the two never meet.
    """
    return f"{prefix}:stats:{{{tool}}}"


def recent_stats_key(prefix: str, tool: str, bucket_s: int) -> str:
    """The hash of `tool`'s counts in the short bucket starting at `bucket_s` (epoch seconds)."""
    return f"{stats_key(prefix, tool)}:{bucket_s}"


def limits_key(prefix: str, tool: str) -> str:
    """The limits `tool`'s workers last enforced, as text, so `status` can spot another config."""
    return f"{stats_key(prefix, tool)}:limits"


def tenants_key(prefix: str, tool: str, bucket_s: int) -> str:
    """The hash of a fair tool's per-tenant counts for the 10 s bucket starting at `bucket_s`."""
    return f"{stats_key(prefix, tool)}:tenants:{bucket_s}"


def waiting_key(prefix: str, tool: str, reason: str) -> str:
    """The set of `tool`'s calls held with an ETA because of `reason`, scored by ETA (ms)."""
    return f"{stats_key(prefix, tool)}:waiting:{reason}"


def waiting_decided_key(prefix: str, tool: str) -> str:
    """The set of `tool`'s decisions that ended a wait, as '<task id>|<delays before>', scored
    by when they were noted (ms): a delay flushed after its next decision is not written."""
    return f"{stats_key(prefix, tool)}:waiting-decided"
