"""The asyncio gate: the same scripts and answers as `Gate`, over `redis.asyncio`.

Concurrent `acquire`s and `settle`s made in one event-loop tick share one write, on one
connection, behind the calls still in flight (`throttle/batcher.py`); `slot()` waits for a
call's reserved slot in apps without Celery.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from throttle.batcher import Batcher
from throttle.config import Config
from throttle.decision import Action, Decision
from throttle.errors import Throttled
from throttle.gate_args import GateBase
from throttle.keys import (
    DEFAULT_PREFIX,
    cooldown_left_s,
    overrides_version_key,
    tool_defaults_key,
)
from throttle.scripts import LuaScript, encode
from throttle.store import (
    DEFAULT_SOCKET_TIMEOUT_S,
    AsyncStoreClient,
    StoreErrors,
    client_options,
    connect_async,
    describe_client,
    mask_url,
)


class AsyncGate(GateBase):
    """The asyncio gate over `redis.asyncio`, with `slot()` for apps without Celery."""

    def __init__(
        self,
        redis_url_or_client: str | AsyncStoreClient,
        config: Config,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    ) -> None:
        if isinstance(redis_url_or_client, str):
            url = mask_url(redis_url_or_client)
            with StoreErrors(url):
                self.client: AsyncStoreClient = connect_async(
                    redis_url_or_client, **client_options(socket_timeout_s, asyncio=True)
                )
        else:
            self.client = redis_url_or_client
            url = describe_client(redis_url_or_client)
        super().__init__(config, prefix, url)
        self._load_scripts(self.client)
        self._settle_script = LuaScript("settle")
        self._batch = Batcher(self.client)

    async def acquire(
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
        """Decide one call; the same contract as `Gate.acquire`."""
        if self._defaults.due(tool):
            await self.refresh_defaults()
        keys, args = self._acquire_call(tool, member, key, cost, deadline_s, now_s, receipt,
                                        fair_key)
        packed = self._packed_fcall(tool, args, receipt)
        with self._errors:
            raw = await self._batch.run(self._acquire_script, keys, args, packed_fcall=packed)
        return self._decision(raw)

    async def refresh_defaults(self) -> None:
        """`Gate.refresh_defaults`, over asyncio."""
        with self._errors:
            version = await self.client.get(overrides_version_key(self.prefix))
            if self._defaults.checked(version):
                fields = self._defaults.fields
                self._defaults.load(await self.client.hmget(tool_defaults_key(self.prefix),
                                                            fields), version)

    async def release(self, tool: str, member: str, *, key: Any = None) -> bool:
        """Free `member`'s unused reservation; True if it held one."""
        keys = self._keys(self.config.tool(tool), key)
        with self._errors:
            return bool(await self._release(keys=self._release_keys(keys), args=[member]))

    async def settle(self, tool: str, member: str, actual_units: float, *, key: Any = None,
                     wait_s: float = 0.0) -> bool:
        """Correct `member`'s charge to what it really cost; False if it left the windows.

        `wait_s`: how long the correction may wait for other calls to share its round trip.
        """
        keys = [name.encode() for name in self._settle_keys(tool, key, actual_units)]
        args = [encode(member), encode(actual_units)]
        with self._errors:
            return bool(await self._batch.run(self._settle_script, keys, args, wait_s=wait_s))

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
        with self._errors:
            return float(await self._cooldown(keys=keys, args=args)) / 1000

    async def cooldown_left(self, tool: str, *, key: Any = None) -> float:
        """Seconds left in `tool`'s cooldown; 0 if none."""
        name = self._keys(self.config.tool(tool), key).cooldown
        with self._errors:
            return cooldown_left_s(await self.client.pttl(name))

    async def finish(self, tool: str, member: str, *, key: Any = None) -> None:
        """Give back `member`'s concurrency lease."""
        leases = self._keys(self.config.tool(tool), key).leases
        if leases is None:
            return
        with self._errors:
            await self.client.zrem(leases, member)

    @asynccontextmanager
    async def slot(
        self, tool: str, *, key: Any = None, cost: float = 1, deadline_s: float | None = None,
        member: str | None = None, fair_key: Any = None,
    ) -> AsyncIterator[Decision]:
        """Wait for this call's reserved slot, then run the block.

        Raises `Throttled` (carrying the tool's fallback) when the slot would miss the deadline.
        `member` names the call in the windows (default: a new id), e.g. to `settle` it;
        `fair_key` is its tenant, for a tool shared with `fair_by`.
        """
        member = member or uuid.uuid4().hex
        budget_s = self.config.tool(tool).max_delay_ms / 1000
        if deadline_s is not None:
            budget_s = min(budget_s, deadline_s)
        started = time.monotonic()
        try:
            while True:
                left_s = budget_s - (time.monotonic() - started)
                decision = await self.acquire(tool, member, key=key, cost=cost, deadline_s=left_s,
                                              fair_key=fair_key)
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
