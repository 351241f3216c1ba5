"""The gateway's core: publish a call on its tool's queue, await its result, answer.

The gateway is a Celery client like any web app: its own app on the workers' broker, with
`Throttle` over the same tools file, so `.apply_async` validates the arguments and
registers the call for recovery exactly as `.delay()` does. Its tasks have no body here
(the workers run them). The app has no result backend: Celery's Redis backend would
subscribe a blocking pub/sub connection per call; `ResultWaiter` reads the same results
on the event loop instead. Publishing (kombu and one Redis round trip) runs on a small
thread pool, so many waiting requests hold no thread.

In direct mode (`settings.direct`) the gateway gates each call itself and runs the tool's
body in its own process (`throttle.gateway.direct`); both modes answer alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from celery import Celery, states
from celery.backends.redis import RedisBackend
from kombu.utils.uuid import uuid

from throttle.async_gate import AsyncGate
from throttle.errors import ConfigError, InvalidToolCall
from throttle.functions import load_function
from throttle.gateway.chat import ChatCall, completion
from throttle.gateway.direct import DirectRunner
from throttle.gateway.errors import ApiError, failure_error
from throttle.gateway.quota_headers import QuotaHeaders
from throttle.gateway.retry import retry_after_s
from throttle.gateway.settings import GatewaySettings
from throttle.quotas import day_bounds_ms, days_tz
from throttle.routing import Throttle
from throttle.store import connect_async, mask_url
from throttle.task import FALLBACK_MARK
from throttle.waiter import ResultWaiter

logger = logging.getLogger("throttle.gateway")

HEALTH_TIMEOUT_S = 3.0
NEVER_FITS = "cost_exceeds_limit"  # the fallback reason of a call no window can ever hold
SOCKET_TIMEOUT_S = 5.0
REASONS = {
    "deadline": "its next free slot lies past this call's deadline ({budget:g}s)",
    "cooldown": "the upstream asked for a pause longer than this call could wait",
    "store_unavailable": "the gate's Redis could not be reached (on_store_error = fallback)",
    NEVER_FITS: "this call alone costs more than one of its limits allows, so retrying "
                "does not help; shorten the prompt or lower max_tokens",
    "redelivery_cap": "the call's worker was lost too many times",
    "quota": "its daily quota is spent until it resets at midnight ({tz})",
}


@dataclass(frozen=True)
class Answer:
    """A completed call's HTTP answer."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _runs_on_workers(**_: Any) -> None:
    """The gateway only publishes; the workers run the tool's real body."""
    raise RuntimeError("this task runs on the workers (celery -A workers worker)")


class Gateway:
    """Publishes calls and awaits their results for the HTTP layer."""

    def __init__(self, settings: GatewaySettings) -> None:
        body = None if settings.direct is None else _load_body(settings.direct)
        self.settings = settings
        self.config = settings.config
        self.celery = Celery("throttle-gateway", broker=settings.broker_url)
        self.throttle = Throttle(self.celery, self.config, settings.redis_url,
                                 prefix=settings.prefix)
        self.tasks = {name: self.throttle.tool(name)(_runs_on_workers)
                      for name, tool in self.config.tools.items() if tool.takes_chat}
        # Only to name and read result keys as the workers write them; never connects.
        self.backend = RedisBackend(app=self.celery, url=settings.result_backend)
        self.publisher = ThreadPoolExecutor(settings.publish_threads,
                                            thread_name_prefix="gateway-publish")
        options: dict[str, Any] = {"socket_connect_timeout": SOCKET_TIMEOUT_S,
                                   "socket_timeout": SOCKET_TIMEOUT_S}
        self.results = redis.asyncio.Redis.from_url(settings.result_backend, **options)
        self.store = connect_async(settings.redis_url, **options)
        self.quota_headers = QuotaHeaders(self.store, settings.prefix)
        self.waiter = ResultWaiter(self.results, self._decode, sweep_s=settings.sweep_s)
        self.direct: DirectRunner | None = None
        if body is not None:
            self.direct = DirectRunner(
                AsyncGate(self.store, self.config, prefix=settings.prefix), settings.prefix,
                body, settings.body_threads, lambda: self.throttle.gate.adapter)

    def reload(self) -> None:
        """Load the tools file again (on SIGHUP); a ConfigError keeps the running config."""
        self.config = self.throttle.reload()
        if self.direct is not None:
            self.direct.use(self.config)

    async def start(self) -> None:
        await self.waiter.start()

    async def close(self) -> None:
        await self.waiter.close()
        self.publisher.shutdown(wait=False, cancel_futures=True)
        if self.direct is not None:
            await self.direct.close()
        await self.results.aclose()
        await self.store.aclose()
        self.throttle.gate.close()

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        meta = self.backend.decode(payload)
        if not isinstance(meta, dict) or meta.get("status") not in states.READY_STATES:
            return None
        return meta

    async def complete(self, call: ChatCall, deadline_s: float | None = None) -> Answer:
        """Run `call` through its tool's gate (and queue, unless in direct mode); the
        completion, or an ApiError."""
        tool = self.config.tool(call.tool)
        budget_s = tool.max_delay_ms / 1000
        if deadline_s is not None:
            budget_s = min(budget_s, deadline_s)
        task_id = uuid()
        headers = {"X-Throttle-Tool": call.tool, "X-Throttle-Task-Id": task_id}
        if self.direct is not None:
            self._check(call)
            meta = await self.direct.run(call.tool, call.kwargs, deadline_s, task_id)
        else:
            meta = await self._on_workers(call, task_id, deadline_s, budget_s, headers)
        return await self._answer(call, meta, task_id, budget_s, headers)

    async def _on_workers(self, call: ChatCall, task_id: str, deadline_s: float | None,
                          budget_s: float, headers: dict[str, str]) -> dict[str, Any]:
        """Publish the call on its tool's queue and wait for the workers' result."""
        tool = self.config.tool(call.tool)
        wait_s = budget_s + self.settings.run_timeout_s
        try:
            async with self.waiter.watch(self.backend.get_key_for_task(task_id)) as result:
                await self._publish(call, task_id, deadline_s)
                meta = await asyncio.wait_for(result, wait_s)
        except TimeoutError:
            raise ApiError(
                504, f"no answer from tool {call.tool!r} within {wait_s:g}s (its deadline "
                f"{budget_s:g}s plus --run-timeout {self.settings.run_timeout_s:g}s); check "
                f"that a worker serves queue {tool.queue} (throttle worker {call.tool}); the "
                f"call (task {task_id}) may still complete", type="server_error",
                code="gateway_timeout", headers=headers) from None
        except (redis.RedisError, OSError) as exc:
            raise ApiError(
                503, f"the result backend at {mask_url(self.settings.result_backend)} cannot "
                f"be reached ({type(exc).__name__}); check that it runs, then send the call "
                "again", code="result_backend_unavailable", headers=headers) from None
        return meta

    async def _answer(self, call: ChatCall, meta: dict[str, Any], task_id: str,
                      budget_s: float, headers: dict[str, str]) -> Answer:
        """The HTTP answer for a call's result (a completion, a fallback or a failure)."""
        tool = self.config.tool(call.tool)
        headers.update(await self.quota_headers(self.config, tool,
                                                call.kwargs.get(tool.key) if tool.key else None))
        status = meta["status"]
        if status == states.SUCCESS:
            mark = meta.get("traceback")
            if isinstance(mark, str) and mark.startswith(FALLBACK_MARK):
                reason = mark[len(FALLBACK_MARK):].strip(" ()")
                raise await self._throttled(call, reason, budget_s, meta.get("result"), headers)
            body = completion(meta.get("result"), task_id=task_id, created=int(time.time()))
            return Answer(200, body, {**headers, "X-Throttle-Outcome": "result"})
        if status == states.FAILURE:
            error = failure_error(call.tool, meta.get("result"))
            error.headers.update(headers)
            raise error
        raise ApiError(503, f"the call to tool {call.tool!r} was revoked before it ran "
                       "(a worker shut down, or an operator revoked it); send it again",
                       code="revoked", headers=headers)

    def _check(self, call: ChatCall) -> None:
        """Direct mode: the schema check `.delay()` makes, as a 400 (the arguments are parsed
        JSON, so the fast check applies)."""
        try:
            self.tasks[call.tool].check_arguments((), call.kwargs, parsed=True)
        except InvalidToolCall as exc:
            raise _invalid(call, exc) from None

    async def _publish(self, call: ChatCall, task_id: str, deadline_s: float | None) -> None:
        task = self.tasks[call.tool]
        send = functools.partial(task.apply_async, kwargs=call.kwargs, task_id=task_id,
                                 deadline_s=deadline_s)
        try:
            await asyncio.get_running_loop().run_in_executor(self.publisher, send)
        except InvalidToolCall as exc:
            raise _invalid(call, exc) from None
        except Exception as exc:
            logger.error("tool %s: could not publish a call (%s: %s)", call.tool,
                         type(exc).__name__, exc)
            raise ApiError(
                503, f"the call could not be queued on the broker at "
                f"{mask_url(self.settings.broker_url)} ({type(exc).__name__}); check that the "
                "broker runs, then send it again", code="broker_unavailable") from None

    async def _throttled(self, call: ChatCall, reason: str, budget_s: float, fallback: Any,
                         headers: dict[str, str]) -> ApiError:
        tool = self.config.tool(call.tool)
        why = REASONS.get(reason, f"the gate answered with the fallback ({reason})")
        fallback_headers = {**headers, "X-Throttle-Outcome": "fallback",
                            "X-Throttle-Fallback-Reason": reason}
        if reason == NEVER_FITS:  # no wait helps, so no Retry-After (clients would loop)
            return ApiError(400, f"tool {call.tool!r} cannot run this call: {why}. The "
                            "tool's fallback is in 'fallback'", code=NEVER_FITS,
                            headers=fallback_headers, extra={"fallback": fallback})
        key_value = call.kwargs.get(tool.key) if tool.key else None
        wait_s = await retry_after_s(self.store, self.settings.prefix, tool, key_value,
                                     budget_s)
        tz = days_tz(tool, self.config)
        if reason == "quota":  # nothing frees up before the quota resets (the pool's too)
            midnight_s = day_bounds_ms(time.time(), tz)[2] / 1000
            wait_s = max(wait_s, math.ceil(midnight_s - time.time()))
        return ApiError(
            429, f"tool {call.tool!r} is at its limit: "
            f"{why.format(budget=budget_s, tz=tz)}; retry "
            f"after {wait_s}s. The tool's fallback is in 'fallback'", code="rate_limit_exceeded",
            headers={**fallback_headers, "Retry-After": str(wait_s)},
            extra={"fallback": fallback},
        )

    async def health(self) -> dict[str, str]:
        """'ok' or what failed, for the gate's Redis, the result backend and the broker (not
        in direct mode)."""
        loop = asyncio.get_running_loop()
        checks: dict[str, Awaitable[None]] = {
            "redis": self._ping(self.store),
            "result_backend": self._ping(self.results),
        }
        if self.direct is None:  # direct mode publishes nothing
            checks["broker"] = loop.run_in_executor(self.publisher, self._check_broker)
        answers = {}
        for name, check in checks.items():
            try:
                await asyncio.wait_for(check, HEALTH_TIMEOUT_S)
                answers[name] = "ok"
            except Exception as exc:
                answers[name] = f"error: {type(exc).__name__}: {exc}"[:300]
        return answers

    @staticmethod
    async def _ping(client: redis.asyncio.Redis | redis.asyncio.RedisCluster) -> None:
        await client.ping()

    def _check_broker(self) -> None:
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                         timeout=HEALTH_TIMEOUT_S - 0.5)


def _load_body(path: str) -> Callable[..., Any]:
    """Direct mode's tool body, or a ConfigError naming --direct."""
    try:
        return load_function(path)
    except ValueError as exc:
        raise ConfigError(f"--direct: {exc}; name the tool body as 'module:function', "
                          "importable by the gateway (PYTHONPATH)") from None


def _invalid(call: ChatCall, exc: InvalidToolCall) -> ApiError:
    head = exc.message.split(":", 1)[0]
    param = head if head in call.kwargs or head in ("messages", "tools") else None
    return ApiError(400, str(exc), param=param, code="invalid_tool_call")


@contextlib.asynccontextmanager
async def running(settings: GatewaySettings) -> AsyncIterator[Gateway]:
    """A started Gateway, closed afterwards."""
    gateway = Gateway(settings)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()
