"""Direct mode: the gateway gates each call itself and runs the tool's body in its process.

No broker, no worker, no result backend round trip: `AsyncGate.slot` waits for the call's
slot (the same script and windows the workers use, so both modes can share one limit), and
the body (`--direct module:function`) runs: a coroutine body (the LLM tool's
`workers.tools.llm_async:chat_completion`) on the event loop, at most `threads` at once, and
a plain one (`workers.tools.llm:chat_completion`) on a thread of the gateway's own pool; a
coroutine body's `aclose()`, if it has one, is awaited as the gateway stops. What the
workers do around a body happens here too: the arguments are checked against the tool's
schema, the cost is charged, and settled after the answer (a correction the caller need
not wait for, sent with the next calls' decisions); the upstream's headers the body
reports go to the adaptive limits (`throttle.adaptive`); an `UpstreamBusy` pauses the tool
for everyone and the call waits the pause out, or falls back when the pause outlasts its
deadline. The answer has the shape of a Celery result, so both modes answer alike.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import states

from throttle import adaptive
from throttle.async_gate import AsyncGate
from throttle.config import Config, ToolConfig
from throttle.errors import StoreUnavailable, Throttled, UpstreamBusy
from throttle.results import FALLBACK_MARK

logger = logging.getLogger("throttle.gateway")

MAX_PAUSES = 5  # upstream pauses one call waits out before it falls back
PAUSE_MARK = "~pause"
Ran = tuple[Any, Exception | None]  # a body's result, or the exception it raised
SETTLE_WAIT_S = 5.0  # how long closing waits for settlements still under way
SETTLE_RIDE_S = 0.01  # how long a settlement may wait to share the next decisions' round trip


def fallback_meta(tool: ToolConfig, reason: str) -> dict[str, Any]:
    """A fallback answer, as the workers store it."""
    return {"status": states.SUCCESS, "result": tool.fallback,
            "traceback": f"{FALLBACK_MARK} ({reason})"}


def failure_meta(exc: BaseException) -> dict[str, Any]:
    """A failed body's answer, as Celery's JSON result backend stores the exception."""
    return {"status": states.FAILURE,
            "result": {"exc_type": type(exc).__name__, "exc_message": list(exc.args)}}


def is_coroutine_body(body: Callable[..., Any]) -> bool:
    """Whether calling `body` makes a coroutine (an `async def`, or an object whose
    `__call__` is one)."""
    return inspect.iscoroutinefunction(body) or inspect.iscoroutinefunction(
        type(body).__call__)


class DirectRunner:
    """Gates with `AsyncGate` and runs `body`, at most `threads` calls at once: awaited on
    the event loop when it is a coroutine body, else on `threads` threads of this process;
    `adapter()` is the (sync) gate's `Adapter` the answers are reported to."""

    def __init__(self, gate: AsyncGate, prefix: str, body: Callable[..., Any],
                 threads: int, adapter: Callable[[], adaptive.Adapter]) -> None:
        self.gate, self.prefix = gate, prefix
        self.body = body
        self.adapter = adapter
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gateway-body")
        self.on_loop = is_coroutine_body(body)
        self._running = asyncio.Semaphore(threads)  # a coroutine body's calls at once
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> Config:
        return self.gate.config

    def use(self, config: Config) -> None:
        """Gate with a reloaded config from the next call on (same connections)."""
        self.gate = AsyncGate(self.gate.client, config, prefix=self.prefix)

    async def run(self, tool_name: str, kwargs: dict[str, Any], deadline_s: float | None,
                  call_id: str) -> dict[str, Any]:
        """The call's answer (result, fallback or failure) in Celery's result form.

        `call_id` is the call's member in the gate's windows (`<id>~pause<n>` after n
        upstream pauses, each a new admission).
        """
        tool = self.config.tool(tool_name)
        key = kwargs.get(tool.key) if tool.key else None
        budget_s = tool.max_delay_ms / 1000
        if deadline_s is not None:
            budget_s = min(budget_s, deadline_s)
        cost = tool.units(kwargs)
        started = time.monotonic()
        for pauses in range(MAX_PAUSES):
            member = f"{call_id}{PAUSE_MARK}{pauses}" if pauses else call_id
            left_s = budget_s - (time.monotonic() - started)
            ran: Ran | None = None
            try:
                async with self.gate.slot(tool_name, key=key, cost=cost, deadline_s=left_s,
                                          member=member):
                    ran = await self._call(tool_name, kwargs, member)
            except Throttled as throttled:
                return fallback_meta(tool, throttled.reason)
            except StoreUnavailable as exc:
                if ran is not None:  # the lease was not given back: it times out
                    logger.warning("tool %s: lease not returned (%s)", tool_name, exc)
                elif tool.on_store_error == "admit":
                    logger.warning("tool %s: %s; running the call ungated (on_store_error = "
                                   "admit)", tool_name, exc)
                    ran = await self._call(tool_name, kwargs, member)
                else:
                    logger.warning("tool %s: %s; answering with the fallback", tool_name, exc)
            if ran is None:  # no store, and the tool's policy is to fall back
                return fallback_meta(tool, "store_unavailable")
            result, error = ran
            if isinstance(error, UpstreamBusy):
                await self._pause(tool, error, key, member)
                if error.retry_after_s > budget_s - (time.monotonic() - started):
                    return fallback_meta(tool, "cooldown")
                continue
            if error is not None:
                return failure_meta(error)
            settling = asyncio.create_task(self._settle(tool, kwargs, result, key, member))
            self._settling.add(settling)
            settling.add_done_callback(self._settling.discard)
            return {"status": states.SUCCESS, "result": result}
        return fallback_meta(tool, "cooldown")

    async def _call(self, tool: str, kwargs: dict[str, Any], member: str) -> Ran:
        """Run the body (on the loop or a thread): its result, or the exception it raised."""
        if self.on_loop:
            async with self._running:
                return await self._await_body(tool, kwargs, member)
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(self._run_body, tool, kwargs, member))

    async def _await_body(self, tool: str, kwargs: dict[str, Any], member: str) -> Ran:
        """On the loop: the coroutine body, then what it heard of the upstream's limits (sent
        from a thread: the adapter's Redis client blocks)."""
        answers: list[adaptive.Answer] = []
        ran: Ran
        try:
            with adaptive.collecting(answers):
                ran = await self.body(**kwargs), None
        except UpstreamBusy as busy:
            ran = None, busy
        except Exception as exc:
            return None, exc
        if self._adapts(tool):
            await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(
                self._report, tool, answers, busy=ran[1] is not None, member=member))
        return ran

    def _adapts(self, tool: str) -> bool:
        try:
            return self.adapter().adapts(tool)
        except StoreUnavailable as exc:
            logger.warning("tool %s: upstream limits not reported (%s)", tool, exc)
            return False

    def _run_body(self, tool: str, kwargs: dict[str, Any], member: str) -> Ran:
        """On a body thread: the body, then what it heard of the upstream's limits."""
        answers: list[adaptive.Answer] = []  # what the body hands to report_headers
        try:
            with adaptive.collecting(answers):
                result = self.body(**kwargs)
        except UpstreamBusy as busy:
            self._report(tool, answers, busy=True, member=member)
            return None, busy
        except Exception as exc:
            return None, exc
        self._report(tool, answers, busy=False, member=member)
        return result, None

    def _report(self, tool: str, answers: list[adaptive.Answer], *, busy: bool,
                member: str) -> None:
        """Move the adaptive limits by what the upstream said (never fails the call)."""
        try:
            adapter = self.adapter()
            if adapter.adapts(tool):
                adapter.report(tool, answers, busy=busy, member=member)
        except StoreUnavailable as exc:
            logger.warning("tool %s: upstream limits not reported (%s)", tool, exc)

    async def _pause(self, tool: ToolConfig, busy: UpstreamBusy, key: Any, member: str) -> None:
        logger.warning("tool %s: %s; pausing it everywhere", tool.name, busy)
        try:
            await self.gate.cool_down(tool.name, busy.retry_after_s, key=key, member=member)
        except StoreUnavailable as exc:
            logger.warning("tool %s: cooldown not shared (%s)", tool.name, exc)

    async def _settle(self, tool: ToolConfig, kwargs: dict[str, Any], result: Any, key: Any,
                      member: str) -> None:
        try:
            units = tool.settled_units(kwargs, result)
            if units is not None:
                await self.gate.settle(tool.name, member, units, key=key, wait_s=SETTLE_RIDE_S)
        except StoreUnavailable as exc:
            logger.warning("tool %s: charge not settled (%s)", tool.name, exc)
        except Exception as exc:  # a result the settle function cannot read
            logger.warning("tool %s: charge not settled (%s: %s)", tool.name,
                           type(exc).__name__, exc)

    async def close(self) -> None:
        """Finish the settlements under way, stop the body threads (the gate's connections
        belong to the gateway)."""
        if self._settling:
            await asyncio.wait(self._settling, timeout=SETTLE_WAIT_S)
        self.pool.shutdown(wait=False, cancel_futures=True)
        aclose = getattr(self.body, "aclose", None)
        if self.on_loop and aclose is not None:
            try:
                await aclose()
            except Exception as exc:
                logger.warning("direct mode: the body's aclose() failed (%s: %s)",
                               type(exc).__name__, exc)
