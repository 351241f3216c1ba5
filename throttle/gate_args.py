"""What `Gate` and `AsyncGate` share: the scripts' keys and arguments, built (and encoded)
once per tool where they do not depend on the call, and the answer typed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from throttle.config import Config, ToolConfig
from throttle.decision import Decision, decision_of
from throttle.errors import InvalidToolCall
from throttle.fairness import Fairness, fairness_of
from throttle.keys import (
    ToolKeys,
    check_prefix,
    decided_key,
    fair_keys,
    keys_for,
    override_fields,
    overrides_key,
    pool_quota_key,
    quota_key,
    receipts_key,
    registry_keys,
    tags_per_key_value,
)
from throttle.limit import Limit
from throttle.live_defaults import LiveDefaults
from throttle.overrides import in_force
from throttle.quotas import DayBounds, days_tz, quota_tail
from throttle.scripts import LuaScript, encode, load_script, resp
from throttle.store import StoreErrors

# Run through redis-py `Script`s; acquire and register take the lean path of scripts.py (the
# `_acquire` Script stays for callers that queue a decision on their own pipeline).
SCRIPTS = ("acquire", "release", "settle", "cooldown", "claim")


class GateBase:
    """Argument building and answer typing shared by `Gate` and `AsyncGate`."""

    def __init__(self, config: Config, prefix: str, url: str, *,
                 registers_calls: bool = False) -> None:
        self.config = config
        self.prefix = check_prefix(prefix)
        self.url = url
        # Calls are registered after their publish (throttle/registrar.py): a decision then
        # notes a call not yet registered, so its late registration is dropped.
        self.registers_calls = registers_calls
        self._errors = StoreErrors(url)
        self.fairness: dict[str, Fairness | None] = {
            name: fairness_of(config, tool) for name, tool in config.tools.items()
        }
        # Per tool, built once and encoded: the fixed tail of the script's arguments, and
        # its keys when they do not depend on a key argument.
        self._tails = {name: self._tail(tool, tool.limits) for name, tool in config.tools.items()}
        self._quota_tails = {name: quota_tail(config, tool, tool.quotas)
                             for name, tool in config.tools.items()}
        days = {tz: DayBounds(tz) for tz in {days_tz(t, config) for t in config.tools.values()}}
        self._days = {name: days[days_tz(tool, config)] for name, tool in config.tools.items()}
        # The defaults set live of per-key tools whose key values have tags of their own:
        # cached (throttle/live_defaults.py) and passed in place of the file's limits.
        self._defaults = LiveDefaults(
            {name for name, tool in config.tools.items() if tags_per_key_value(tool)},
            self._live_tails)
        self._fixed_live = {
            name: self._live_fields(tool, None) for name, tool in config.tools.items()
            if tool.key is None
        }
        self._fixed_keys = {
            name: self._acquire_keys(tool, None) for name, tool in config.tools.items()
            if tool.key is None
        }
        self._acquire_script = LuaScript("acquire")
        self._packings: dict[str, AcquirePacking | None] = {}  # (None: hiredis packs)
        self._register_script = LuaScript("register")

    def _load_scripts(self, client: Any) -> None:
        (self._acquire, self._release, self._settle, self._cooldown, self._claim) = (
            client.register_script(load_script(name)) for name in SCRIPTS
        )

    def _tail(self, tool: ToolConfig, limits: Sequence[Limit]) -> list[bytes]:
        """The fixed arguments after now_ms: gap, margin, the limits, the pool's, the cap."""
        return [encode(value) for value in
                (self._gap_ms(tool), tool.slot_margin_ms, *self._limits_of(tool, limits))]

    def _live_tails(self, name: str, live: tuple[Limit, ...]
                    ) -> tuple[list[bytes], tuple[bytes, list[bytes]]]:
        """The argument tails of a tool whose default was set live to `live`."""
        tool = self.config.tools[name]
        sliding, quotas = in_force(live, tool.limits, tool.quotas)
        return self._tail(tool, sliding), quota_tail(self.config, tool, quotas)

    def _limits_of(self, tool: ToolConfig, limits: Sequence[Limit]) -> list[Any]:
        args: list[Any] = [len(limits)]
        for limit in limits:
            args += [limit.max, limit.window_ms]
        pool = self.config.pools[tool.pool] if tool.pool else None
        args.append(len(pool.limits) if pool else 0)
        if pool and tool.priority:
            share = pool.shares[tool.priority]
            for limit in pool.limits:
                args += [share * limit.max, limit.window_ms]
        return [*args, tool.concurrency or 0, tool.lease_timeout_ms]

    @staticmethod
    def _gap_ms(tool: ToolConfig) -> float:
        if tool.pace != "even":
            return 0.0
        return max(limit.window_ms / limit.max for limit in tool.limits)

    def _keys(self, tool: ToolConfig, key: Any) -> ToolKeys:
        if tool.key is not None and key is None:
            raise InvalidToolCall(
                tool.name, f"its limits apply per {tool.key!r}: pass key=<the call's {tool.key}>"
            )
        try:
            return keys_for(self.prefix, tool, None if tool.key is None else key)
        except (TypeError, ValueError) as exc:
            raise InvalidToolCall(
                tool.name, f"its key value must be a JSON value (a string, number, list or "
                f"object): {exc}"
            ) from None

    def _acquire_keys(self, tool: ToolConfig, key: Any) -> list[bytes]:
        tool_keys = self._keys(tool, key)
        keys = [*tool_keys.as_list(), tool_keys.free]
        if tool.key is None or tool.pool:  # the registry shares the decision's hash tag
            keys += self.registry(tool.name)
            if self.registers_calls:
                keys.append(decided_key(self.prefix, tool.name, tool.pool))
        keys += [overrides_key(self.prefix, tool, key), quota_key(tool_keys)]
        if tool.pool:
            keys.append(pool_quota_key(self.prefix, tool.pool))
        fair = self.fairness[tool.name]
        if fair is not None:  # after every other key but the receipts (acquire.lua)
            keys += fair_keys(tool_keys, fair.pool, self.prefix)
        return [name.encode() for name in keys]

    def _live_fields(self, tool: ToolConfig, key: Any) -> list[bytes]:
        """The fields of the live limits acquire.lua reads (throttle/overrides.py)."""
        tool_field, tier_field = override_fields(tool.name, key if tool.key else None)
        share = self.config.pools[tool.pool].shares[tool.priority] if (
            tool.pool and tool.priority) else 1
        return [encode(value) for value in
                (tool_field, tier_field, "pool" if tool.pool else "", share)]

    def registry(self, tool: str) -> tuple[str, str]:
        """The keys of `tool`'s registry of undecided calls (see throttle/recovery.py)."""
        return registry_keys(self.prefix, tool, self.config.tool(tool).pool)

    def _acquire_call(
        self,
        tool_name: str,
        member: str,
        key: Any,
        cost: float,
        deadline_s: float | None,
        now_s: float | None,
        receipt: str | None = None,
        fair_key: Any = None,
    ) -> tuple[list[bytes], list[bytes]]:
        tool = self.config.tool(tool_name)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not (
            0 < cost < math.inf
        ):
            raise InvalidToolCall(
                tool_name, f"cost must be greater than zero (a finite number), got {cost!r}"
            )
        if not isinstance(member, str) or not member:
            raise InvalidToolCall(tool_name, f"the member (task id) must be a non-empty "
                                  f"string, got {member!r}")
        deadline_ms: float = tool.max_delay_ms
        if deadline_s is not None:  # may be negative: the deadline has passed
            deadline_ms = min(deadline_ms, deadline_s * 1000)
        tail, (quotas, quota_maxes) = self._defaults.built.get(tool_name) or (
            self._tails[tool_name], self._quota_tails[tool_name])
        gap_ms, margin_ms, *limits = tail
        now = b"" if now_s is None else b"%.3f" % (now_s * 1000)
        args = [member.encode(), encode(cost), encode(deadline_ms), gap_ms,
                margin_ms, now, *limits,
                *(self._fixed_live.get(tool_name) or self._live_fields(tool, key)),
                quotas, self._days[tool_name].at(now_s), *quota_maxes]
        keys = self._fixed_keys.get(tool_name) or self._acquire_keys(tool, key)
        fair = self.fairness[tool_name]
        if fair is not None:
            args += self._fair_args(tool_name, fair, fair_key)
        args.append(encode(receipt or ""))  # always the last argument (acquire.lua)
        if receipt:
            keys = [*keys, receipts_key(keys[0].decode()).encode()]
        return keys, args

    def _packed_fcall(self, tool_name: str, args: list[bytes], receipt: str | None
                      ) -> bytes | None:
        """The FCALL of an `_acquire_call` in RESP, for a tool whose arguments depend on the
        call only through its own (no key argument, no fair sharing); else None."""
        if tool_name not in self._packings:
            tool = self.config.tools[tool_name]
            function = self._acquire_script.function
            packing = None
            if tool.key is None and self.fairness[tool_name] is None and function:
                plain = self._fixed_keys[tool_name]
                packing = AcquirePacking(
                    function, plain, [*plain, receipts_key(plain[0].decode()).encode()], args,
                    len(self._quota_tails[tool_name][1]))
            self._packings[tool_name] = packing
        packing = self._packings[tool_name]
        return packing.pack(args, bool(receipt)) if packing else None

    @staticmethod
    def _fair_args(tool_name: str, fair: Fairness, fair_key: Any) -> list[bytes]:
        """acquire.lua's fair-sharing arguments: the marker, tenant, weight and horizon."""
        if fair_key is None:
            raise InvalidToolCall(tool_name, f"its calls are shared fairly by {fair.by!r}: "
                                  f"pass fair_key=<the call's {fair.by}>")
        try:
            tenant = fair.tenant_id(fair_key)
        except (TypeError, ValueError) as exc:
            raise InvalidToolCall(tool_name, f"its fair_key must be a JSON value (a string, "
                                  f"number, list or object): {exc}") from None
        return [b"fair", tenant.encode(), encode(fair.weight(fair_key)),
                encode(fair.horizon_ms)]

    @staticmethod
    def _release_keys(keys: ToolKeys) -> list[str]:
        pool = [keys.pool_log, keys.pool_cost] if keys.pool_log and keys.pool_cost else []
        return [keys.log, keys.adm, keys.cost, keys.free, *pool]

    def _settle_keys(self, tool_name: str, key: Any, units: float) -> list[str]:
        if not units >= 0:
            raise InvalidToolCall(tool_name, f"settled units must be >= 0, got {units!r}")
        keys = self._keys(self.config.tool(tool_name), key)
        pool = [keys.pool_log, keys.pool_cost] if keys.pool_log and keys.pool_cost else []
        return [keys.log, keys.cost, *pool]

    def _cooldown_call(
        self, tool_name: str, seconds: float, key: Any, member: str | None, now_s: float | None
    ) -> tuple[list[str], list[Any]]:
        tool = self.config.tool(tool_name)
        if not seconds > 0:
            raise InvalidToolCall(tool_name, f"a cooldown must last more than 0 s, got {seconds!r}")
        now = "" if now_s is None else f"{now_s * 1000:.3f}"
        keys = self._keys(tool, key).as_list()
        return keys, [member or "", seconds * 1000, now, "1" if tool.pool else "0"]

    @staticmethod
    def _decision(raw: Sequence[Any]) -> Decision:
        return decision_of(raw)


class AcquirePacking:
    """A fixed tool's acquire FCALL in RESP, its fixed runs of arguments packed once: a call
    packs only its member, cost, deadline, clock, day bounds and receipt (hiredis packing
    every argument costs the caller ~7 µs a decision). Arguments as `_acquire_call` lays
    them out: member, cost, deadline, gap, margin, now, the limits, the live fields and the
    quota count, the day bounds, the quota maxes, the receipt."""

    __slots__ = ("_at_days", "_heads", "_limits", "_maxes", "_pacing")

    def __init__(self, function: bytes, keys: list[bytes], receipt_keys: list[bytes],
                 args: list[bytes], quotas: int) -> None:
        self._at_days = len(args) - 2 - quotas
        self._heads = tuple(
            b"*%d\r\n" % (3 + len(k) + len(args)) + resp([b"FCALL", function, b"%d" % len(k), *k])
            for k in (keys, receipt_keys))
        self._pacing = resp(args[3:5])
        self._limits = resp(args[6:self._at_days])
        self._maxes = resp(args[self._at_days + 1:-1])

    def pack(self, args: list[bytes], receipt: bool) -> bytes:
        """The FCALL of `args` (with the receipts key when `receipt`)."""
        member, cost, deadline, now, days, tag = (
            args[0], args[1], args[2], args[5], args[self._at_days], args[-1])
        return _PACK % (self._heads[receipt], len(member), member, len(cost), cost,
                        len(deadline), deadline, self._pacing, len(now), now, self._limits,
                        len(days), days, self._maxes, len(tag), tag)


# AcquirePacking.pack's layout, one formatting for the call's six arguments (a third of
# the time of packing them run by run).
_PACK = (b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s"
         b"$%d\r\n%s\r\n")
