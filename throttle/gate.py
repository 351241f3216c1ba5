"""The Redis gate: one atomic Lua call per decision (`Gate`; `AsyncGate` in async_gate.py).

`Gate.acquire` answers ADMIT (run now), DELAY (a slot is reserved `wait_s` from now; come
back then with the same member) or FALLBACK (the slot would miss the deadline; nothing is
reserved). The algorithm lives only in `throttle/lua/*.lua`; this module builds arguments
(the fixed ones encoded once per tool), runs the scripts with EVALSHA (`throttle/scripts.py`:
straight through a connection, NOSCRIPT handled once; concurrent asyncio decisions share one
pipeline per event-loop tick) and types the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from throttle.adaptive import Adapter
from throttle.config import Config, ToolConfig
from throttle.errors import InvalidToolCall
from throttle.fairness import Fairness, fairness_of
from throttle.keys import (
    DEFAULT_PREFIX,
    ToolKeys,
    check_prefix,
    cooldown_left_s,
    fair_keys,
    keys_for,
    override_fields,
    overrides_key,
    overrides_version_key,
    pool_quota_key,
    quota_key,
    receipts_key,
    redelivery_key,
    registry_keys,
    tags_per_key_value,
    tool_defaults_key,
)
from throttle.limit import Limit
from throttle.live_defaults import LiveDefaults
from throttle.overrides import in_force
from throttle.quotas import DayBounds, days_tz, quota_tail
from throttle.scripts import LuaScript, Sent, encode, evalsha, load_script
from throttle.store import (
    DEFAULT_SOCKET_TIMEOUT_S,
    StoreClient,
    StoreErrors,
    client_options,
    connect,
    describe_client,
    mask_url,
)

REGISTRY_TTL_MS = 3_600_000  # a registry outlives its latest check time by an hour
# Run through redis-py `Script`s; acquire and register take the lean path of scripts.py (the
# `_acquire` Script stays for callers that queue a decision on their own pipeline).
SCRIPTS = ("acquire", "release", "settle", "cooldown", "claim")


class Action(StrEnum):
    """What the worker does with a call."""

    ADMIT = "admit"
    DELAY = "delay"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer: the action, how long to wait, the slot (epoch seconds) and why."""

    action: Action
    wait_s: float
    slot_at: float
    reason: str


_ACTIONS: dict[str | bytes, Action] = {
    **{a.value: a for a in Action},
    **{a.value.encode(): a for a in Action},
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GateBase:
    """Argument building and answer typing shared by `Gate` and `AsyncGate`."""

    def __init__(self, config: Config, prefix: str, url: str) -> None:
        self.config = config
        self.prefix = check_prefix(prefix)
        self.url = url
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
        args = [member.encode(), repr(cost).encode(), repr(deadline_ms).encode(), gap_ms,
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
        return [keys.log, keys.rsv, keys.cost, keys.free, *pool]

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
        action, wait_ms, slot_ms, reason = raw
        return Decision(
            _ACTIONS[action], float(wait_ms) / 1000, float(slot_ms) / 1000, _text(reason)
        )


class Registration:
    """A registration sent by `Gate.start_register_call`; `wait()` (required, once) confirms
    it or raises StoreUnavailable."""

    __slots__ = ("_errors", "_sent")

    def __init__(self, sent: Sent, errors: StoreErrors) -> None:
        self._sent, self._errors = sent, errors

    def wait(self) -> None:
        """Wait for the server's answer."""
        with self._errors:
            self._sent.answer()


class Gate(GateBase):
    """The synchronous gate over redis-py: `acquire`, `release`.

    One client serves every thread or greenlet of a process: each command takes a
    connection of its own from the client's pool (`max_connections` bounds it, see `connect`).
    """

    def __init__(
        self,
        redis_url_or_client: str | StoreClient,
        config: Config,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        max_connections: int | None = None,
    ) -> None:
        if isinstance(redis_url_or_client, str):
            url = mask_url(redis_url_or_client)
            with StoreErrors(url):
                self.client: StoreClient = connect(
                    redis_url_or_client, max_connections=max_connections,
                    **client_options(socket_timeout_s),
                )
        else:
            self.client = redis_url_or_client
            url = describe_client(redis_url_or_client)
        super().__init__(config, prefix, url)
        self._load_scripts(self.client)
        self.adapter = Adapter(self.client, config, self.prefix, self._errors)  # adaptive

    def acquire(
        self,
        tool: str,
        member: str,
        *,
        key: Any = None,
        cost: float = 1,
        deadline_s: float | None = None,
        now_s: float | None = None,
        receipt: str | None = None,
        fair_key: Any = None,
    ) -> Decision:
        """Decide one call of `tool` identified by `member` (the task id).

        `deadline_s` tightens the tool's max_delay; `now_s` pins the clock (tests only).
        `receipt` ('<message tag>|<delivery nonce>') names this delivery of the call: an
        admitted member asking again with another receipt is answered 'rerun' (same message
        tag) or 'reused' instead of 'readmitted'. `fair_key` is the call's tenant, required
        for a tool (or pool) with `fair_by`: a DELAY with reason 'parked' is an estimate,
        not a reservation; the call comes back then and keeps its place.
        """
        if self._defaults.due(tool):
            self.refresh_defaults()
        keys, args = self._acquire_call(tool, member, key, cost, deadline_s, now_s, receipt,
                                        fair_key)
        with self._errors:
            raw = evalsha(self.client, self._acquire_script, keys, args)
        return self._decision(raw)

    def refresh_defaults(self) -> None:
        """Read the live defaults of per-key tools again if their version moved (done by
        `acquire` at most every `live_defaults.REFRESH_S`)."""
        with self._errors:
            version = self.client.get(overrides_version_key(self.prefix))
            if self._defaults.checked(version):
                fields = self._defaults.fields
                self._defaults.load(self.client.hmget(tool_defaults_key(self.prefix), fields),
                                    version)

    def release(self, tool: str, member: str, *, key: Any = None) -> bool:
        """Free `member`'s unused reservation; True if it held one."""
        keys = self._keys(self.config.tool(tool), key)
        with self._errors:
            return bool(self._release(keys=self._release_keys(keys), args=[member]))

    def settle(self, tool: str, member: str, actual_units: float, *, key: Any = None) -> bool:
        """Correct `member`'s charge to what it really cost; False if it left the windows."""
        keys = self._settle_keys(tool, key, actual_units)
        with self._errors:
            return bool(self._settle(keys=keys, args=[member, actual_units]))

    def cool_down(
        self,
        tool: str,
        seconds: float,
        *,
        key: Any = None,
        member: str | None = None,
        now_s: float | None = None,
    ) -> float:
        """Admit no call of `tool` (or of its pool) for `seconds`, on every worker.

        `member`, the call the upstream refused, leaves the windows. Returns when the
        cooldown ends (epoch seconds); a cooldown is only ever extended.
        """
        keys, args = self._cooldown_call(tool, seconds, key, member, now_s)
        with self._errors:
            return float(self._cooldown(keys=keys, args=args)) / 1000

    def cooldown_left(self, tool: str, *, key: Any = None) -> float:
        """Seconds left in `tool`'s cooldown (its pool's, for a pooled tool); 0 if none."""
        name = self._keys(self.config.tool(tool), key).cooldown
        with self._errors:
            return cooldown_left_s(self.client.pttl(name))

    def register_call(self, tool: str, member: str, message: str, check_at_s: float) -> None:
        """Note an enqueued call of `tool`, to be counted lost if still undecided at
        `check_at_s` (epoch seconds); `message` is what re-publishes it."""
        self.start_register_call(tool, member, message, check_at_s).wait()

    def start_register_call(
        self, tool: str, member: str, message: str, check_at_s: float
    ) -> Registration:
        """`register_call`, sent now and confirmed by `.wait()`: the caller publishes the
        call in between, so the two round trips overlap."""
        ttl_ms = int((check_at_s - time.time()) * 1000) + REGISTRY_TTL_MS
        keys = [name.encode() for name in self.registry(tool)]
        args = [encode(member), encode(check_at_s * 1000), encode(message), encode(ttl_ms)]
        with self._errors:
            return Registration(Sent(self.client, self._register_script, keys, args),
                                self._errors)

    def forget_call(self, tool: str, member: str) -> None:
        """Take a call out of `tool`'s registry (decided without the gate, or given up)."""
        calls, messages = self.registry(tool)
        with self._errors:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(calls, member)
            pipe.hdel(messages, member)
            pipe.execute()

    def claim_lost(
        self, tool: str, *, retry_s: float, limit: int = 100, now_s: float | None = None
    ) -> list[tuple[str, str]]:
        """Claim `tool`'s registered calls whose check time has come: (id, message) pairs."""
        now_ms = (time.time() if now_s is None else now_s) * 1000
        with self._errors:
            raw = self._claim(keys=self.registry(tool), args=[now_ms, retry_s * 1000, limit])
        return [(_text(raw[i]), _text(raw[i + 1])) for i in range(0, len(raw), 2)]

    def finish(self, tool: str, member: str, *, key: Any = None) -> None:
        """Give back `member`'s concurrency lease (the call ended: result, error or fallback)."""
        leases = self._keys(self.config.tool(tool), key).leases
        if leases is None:
            return
        with self._errors:
            self.client.zrem(leases, member)

    def note_redelivery(self, tool: str, member: str, *, key: Any = None) -> int:
        """Count one more delivery of an already admitted `member`; returns the count."""
        name = redelivery_key(self._keys(self.config.tool(tool), key), member)
        ttl_ms = self.config.visibility_timeout_ms * 10
        with self._errors:
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.pexpire(name, ttl_ms)
            count, _ = pipe.execute()
        return int(count)

    def close(self) -> None:
        """Close the connection pool this gate opened."""
        self.client.close()
