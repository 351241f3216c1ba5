"""The Redis gate: one atomic Lua call per decision, over sync and asyncio clients.

`Gate.acquire` answers ADMIT (run now), DELAY (a slot is reserved `wait_s` from now; come
back then with the same member) or FALLBACK (the slot would miss the deadline; nothing is
reserved). The algorithm lives only in `throttle/lua/*.lua`; this module builds arguments,
runs the scripts with EVALSHA (reloaded on NOSCRIPT by redis-py) and types the answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from throttle.config import Config, ToolConfig
from throttle.errors import InvalidToolCall, StoreUnavailable, Throttled
from throttle.keys import (
    DEFAULT_PREFIX,
    ToolKeys,
    check_prefix,
    cooldown_left_s,
    keys_for,
    redelivery_key,
    registry_keys,
)

DEFAULT_SOCKET_TIMEOUT_S = 2.0
# What a failing store raises (redis-py's cluster errors are not RedisErrors).
STORE_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
REGISTRY_TTL_MS = 3_600_000  # a registry outlives its latest check time by an hour
SCRIPTS = ("acquire", "release", "settle", "cooldown", "claim", "register")


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


def load_script(name: str) -> str:
    """The source of `throttle/lua/<name>.lua`, shipped as package data."""
    return resources.files("throttle").joinpath("lua", f"{name}.lua").read_text("utf-8")


def mask_url(url: str) -> str:
    """`url` with any password (in the netloc or the query) replaced by '***'."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = [
            (name, "***" if name.lower() == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# The synchronous clients the gate and the monitoring commands work with.
StoreClient = redis.Redis | redis.cluster.RedisCluster


def _cluster_url(url: str) -> str | None:
    """The node URL in a `redis+cluster://` (or `rediss+cluster://`) URL, else None."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.removesuffix('+cluster')}://{rest}" if scheme in CLUSTER_SCHEMES else None


def connect(url: str, *, max_connections: int | None = None, **options: Any) -> StoreClient:
    """A client for the gate's Redis. `redis+cluster://host:port` (or `rediss+cluster://`)
    reaches a Redis Cluster through that node; any other URL is one server.

    A single server is connected on first use; a cluster client asks the node for the
    cluster's layout at once, and raises one of STORE_ERRORS if it does not answer.
    `max_connections` bounds a single server's pool: a call past it waits for a free
    connection (at most `socket_connect_timeout`) instead of opening one more.
    """
    node = _cluster_url(url)
    if node is not None:
        return redis.cluster.RedisCluster.from_url(node, **options)
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections,
        timeout=options.get("socket_connect_timeout") or DEFAULT_SOCKET_TIMEOUT_S, **options,
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as from_url: closing the client closes it
    return client


def connect_async(url: str, **options: Any) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """`connect` for asyncio clients."""
    node = _cluster_url(url)
    if node is not None:
        return redis.asyncio.RedisCluster.from_url(node, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def _unreachable(url: str, exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(
        f"the gate's Redis at {url} failed: {type(exc).__name__}: {exc}; check that "
        "Redis runs and that THROTTLE_REDIS_URL points at it",
        url,
    )


def _describe_client(client: Any) -> str:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    if "host" in kwargs:
        scheme = "rediss" if kwargs.get("ssl") else "redis"
        return f"{scheme}://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return type(client).__name__


def _client_options(socket_timeout_s: float) -> dict[str, Any]:
    # Retry once on a dropped connection (a restarted server), never on a timeout: a call
    # that times out raises within the socket timeout instead of hanging.
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "health_check_interval": 30,
    }


_ACTIONS: dict[str | bytes, Action] = {
    **{a.value: a for a in Action},
    **{a.value.encode(): a for a in Action},
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _GateBase:
    """Argument building and answer typing shared by `Gate` and `AsyncGate`."""

    def __init__(self, config: Config, prefix: str, url: str) -> None:
        self.config = config
        self.prefix = check_prefix(prefix)
        self.url = url
        # Per tool, built once: the fixed tail of the script's arguments, and its keys when
        # they do not depend on a key argument.
        self._tails = {
            name: [self._gap_ms(tool), tool.slot_margin_ms, *self._limits_of(tool)]
            for name, tool in config.tools.items()
        }
        self._fixed_keys = {
            name: self._acquire_keys(tool, None) for name, tool in config.tools.items()
            if tool.key is None
        }

    def _load_scripts(self, client: Any) -> None:
        (self._acquire, self._release, self._settle, self._cooldown, self._claim,
         self._register) = (client.register_script(load_script(name)) for name in SCRIPTS)

    def _limits_of(self, tool: ToolConfig) -> list[Any]:
        args: list[Any] = [len(tool.limits)]
        for limit in tool.limits:
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

    def _acquire_keys(self, tool: ToolConfig, key: Any) -> list[str]:
        keys = self._keys(tool, key).as_list()
        if tool.key is None or tool.pool:  # the registry shares the decision's hash tag
            keys += self.registry(tool.name)
        return keys

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
    ) -> tuple[list[str], list[Any]]:
        tool = self.config.tool(tool_name)
        if not cost > 0:
            raise InvalidToolCall(tool_name, f"cost must be greater than zero, got {cost!r}")
        deadline_ms: float = tool.max_delay_ms
        if deadline_s is not None:  # may be negative: the deadline has passed
            deadline_ms = min(deadline_ms, deadline_s * 1000)
        gap_ms, margin_ms, *limits = self._tails[tool_name]
        now = "" if now_s is None else f"{now_s * 1000:.3f}"
        args = [member, cost, deadline_ms, gap_ms, margin_ms, now, *limits]
        keys = self._fixed_keys.get(tool_name) or self._acquire_keys(tool, key)
        return keys, args

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
            raise ValueError(f"a cooldown must last more than 0 s, got {seconds!r}")
        now = "" if now_s is None else f"{now_s * 1000:.3f}"
        keys = self._keys(tool, key).as_list()
        return keys, [member or "", seconds * 1000, now, "1" if tool.pool else "0"]

    def _store_error(self, exc: Exception) -> StoreUnavailable:
        return _unreachable(self.url, exc)

    @staticmethod
    def _decision(raw: Sequence[Any]) -> Decision:
        action, wait_ms, slot_ms, reason = raw
        return Decision(
            _ACTIONS[action], float(wait_ms) / 1000, float(slot_ms) / 1000, _text(reason)
        )


class Gate(_GateBase):
    """The synchronous gate over redis-py: `acquire`, `release`.

    One client serves every thread or greenlet of a process: each command takes a
    connection of its own from the client's pool (`max_connections` bounds it, see `connect`).
    """

    def __init__(
        self,
        redis_url_or_client: str | redis.Redis | redis.cluster.RedisCluster,
        config: Config,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        max_connections: int | None = None,
    ) -> None:
        if isinstance(redis_url_or_client, str):
            url = mask_url(redis_url_or_client)
            try:
                self.client: StoreClient = connect(
                    redis_url_or_client, max_connections=max_connections,
                    **_client_options(socket_timeout_s),
                )
            except STORE_ERRORS as exc:
                raise _unreachable(url, exc) from exc
        else:
            self.client = redis_url_or_client
            url = _describe_client(redis_url_or_client)
        super().__init__(config, prefix, url)
        self._load_scripts(self.client)

    def acquire(
        self,
        tool: str,
        member: str,
        *,
        key: Any = None,
        cost: float = 1,
        deadline_s: float | None = None,
        now_s: float | None = None,
    ) -> Decision:
        """Decide one call of `tool` identified by `member` (the task id).

        `deadline_s` tightens the tool's max_delay; `now_s` pins the clock (tests only).
        """
        keys, args = self._acquire_call(tool, member, key, cost, deadline_s, now_s)
        try:
            raw = self._acquire(keys=keys, args=args)
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc
        return self._decision(raw)

    def release(self, tool: str, member: str, *, key: Any = None) -> bool:
        """Free `member`'s unused reservation; True if it held one."""
        keys = self._keys(self.config.tool(tool), key)
        try:
            return bool(self._release(keys=keys.as_list()[:3], args=[member]))
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    def settle(self, tool: str, member: str, actual_units: float, *, key: Any = None) -> bool:
        """Correct `member`'s charge to what it really cost; False if it left the windows."""
        keys = self._settle_keys(tool, key, actual_units)
        try:
            return bool(self._settle(keys=keys, args=[member, actual_units]))
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

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
        try:
            return float(self._cooldown(keys=keys, args=args)) / 1000
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    def cooldown_left(self, tool: str, *, key: Any = None) -> float:
        """Seconds left in `tool`'s cooldown (its pool's, for a pooled tool); 0 if none."""
        name = self._keys(self.config.tool(tool), key).cooldown
        try:
            return cooldown_left_s(self.client.pttl(name))
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    def register_call(self, tool: str, member: str, message: str, check_at_s: float) -> None:
        """Note an enqueued call of `tool`, to be counted lost if still undecided at
        `check_at_s` (epoch seconds); `message` is what re-publishes it."""
        ttl_ms = int((check_at_s - time.time()) * 1000) + REGISTRY_TTL_MS
        try:
            self._register(keys=self.registry(tool),
                           args=[member, check_at_s * 1000, message, ttl_ms])
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    def forget_call(self, tool: str, member: str) -> None:
        """Take a call out of `tool`'s registry (decided without the gate, or given up)."""
        calls, messages = self.registry(tool)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(calls, member)
            pipe.hdel(messages, member)
            pipe.execute()
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    def claim_lost(
        self, tool: str, *, retry_s: float, limit: int = 100, now_s: float | None = None
    ) -> list[tuple[str, str]]:
        """Claim `tool`'s registered calls whose check time has come: (id, message) pairs."""
        now_ms = (time.time() if now_s is None else now_s) * 1000
        try:
            raw = self._claim(keys=self.registry(tool), args=[now_ms, retry_s * 1000, limit])
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc
        return [(_text(raw[i]), _text(raw[i + 1])) for i in range(0, len(raw), 2)]

    def finish(self, tool: str, member: str, *, key: Any = None) -> None:
        """Give back `member`'s concurrency lease (the call ended: result, error or fallback)."""
        leases = self._keys(self.config.tool(tool), key).leases
        if leases is None:
            return
        try:
            self.client.zrem(leases, member)
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    def note_redelivery(self, tool: str, member: str, *, key: Any = None) -> int:
        """Count one more delivery of an already admitted `member`; returns the count."""
        name = redelivery_key(self._keys(self.config.tool(tool), key), member)
        ttl_ms = self.config.visibility_timeout_ms * 10
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(name)
            pipe.pexpire(name, ttl_ms)
            count, _ = pipe.execute()
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc
        return int(count)

    def close(self) -> None:
        """Close the connection pool this gate opened."""
        self.client.close()


class AsyncGate(_GateBase):
    """The asyncio gate over `redis.asyncio`, with `slot()` for apps without Celery."""

    def __init__(
        self,
        redis_url_or_client: str | redis.asyncio.Redis | redis.asyncio.RedisCluster,
        config: Config,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    ) -> None:
        if isinstance(redis_url_or_client, str):
            url = mask_url(redis_url_or_client)
            options = _client_options(socket_timeout_s)
            options["retry"] = redis.asyncio.retry.Retry(
                NoBackoff(), 1, supported_errors=(redis.ConnectionError,)
            )
            try:
                self.client: redis.asyncio.Redis | redis.asyncio.RedisCluster = connect_async(
                    redis_url_or_client, **options
                )
            except STORE_ERRORS as exc:
                raise _unreachable(url, exc) from exc
        else:
            self.client = redis_url_or_client
            url = _describe_client(redis_url_or_client)
        super().__init__(config, prefix, url)
        self._load_scripts(self.client)

    async def acquire(
        self,
        tool: str,
        member: str,
        *,
        key: Any = None,
        cost: float = 1,
        deadline_s: float | None = None,
        now_s: float | None = None,
    ) -> Decision:
        """Decide one call; the same contract as `Gate.acquire`."""
        keys, args = self._acquire_call(tool, member, key, cost, deadline_s, now_s)
        try:
            raw = await self._acquire(keys=keys, args=args)
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc
        return self._decision(raw)

    async def release(self, tool: str, member: str, *, key: Any = None) -> bool:
        """Free `member`'s unused reservation; True if it held one."""
        keys = self._keys(self.config.tool(tool), key)
        try:
            return bool(await self._release(keys=keys.as_list()[:3], args=[member]))
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    async def settle(self, tool: str, member: str, actual_units: float, *, key: Any = None) -> bool:
        """Correct `member`'s charge to what it really cost; False if it left the windows."""
        keys = self._settle_keys(tool, key, actual_units)
        try:
            return bool(await self._settle(keys=keys, args=[member, actual_units]))
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    async def cool_down(
        self,
        tool: str,
        seconds: float,
        *,
        key: Any = None,
        member: str | None = None,
        now_s: float | None = None,
    ) -> float:
        """Pause `tool` (or its pool) for `seconds`; the same contract as `Gate.cool_down`."""
        keys, args = self._cooldown_call(tool, seconds, key, member, now_s)
        try:
            return float(await self._cooldown(keys=keys, args=args)) / 1000
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    async def cooldown_left(self, tool: str, *, key: Any = None) -> float:
        """Seconds left in `tool`'s cooldown; 0 if none."""
        name = self._keys(self.config.tool(tool), key).cooldown
        try:
            return cooldown_left_s(await self.client.pttl(name))
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    async def finish(self, tool: str, member: str, *, key: Any = None) -> None:
        """Give back `member`'s concurrency lease."""
        leases = self._keys(self.config.tool(tool), key).leases
        if leases is None:
            return
        try:
            await self.client.zrem(leases, member)
        except STORE_ERRORS as exc:
            raise self._store_error(exc) from exc

    @asynccontextmanager
    async def slot(
        self, tool: str, *, key: Any = None, cost: float = 1, deadline_s: float | None = None
    ) -> AsyncIterator[Decision]:
        """Wait for this call's reserved slot, then run the block.

        Raises `Throttled` (carrying the tool's fallback) when the slot would miss the deadline.
        """
        member = uuid.uuid4().hex
        budget_s = self.config.tool(tool).max_delay_ms / 1000
        if deadline_s is not None:
            budget_s = min(budget_s, deadline_s)
        started = time.monotonic()
        try:
            while True:
                left_s = budget_s - (time.monotonic() - started)
                decision = await self.acquire(tool, member, key=key, cost=cost, deadline_s=left_s)
                if decision.action is Action.ADMIT:
                    break
                if decision.action is Action.FALLBACK:
                    raise Throttled(tool, decision.reason, self.config.tool(tool).fallback)
                await asyncio.sleep(decision.wait_s)
        except asyncio.CancelledError:
            # Give the slot back to the callers behind (shielded: we are being cancelled).
            await asyncio.shield(self.release(tool, member, key=key))
            raise
        try:
            yield decision
        finally:
            await self.finish(tool, member, key=key)

    async def aclose(self) -> None:
        """Close the connection pool this gate opened."""
        await self.client.aclose()
