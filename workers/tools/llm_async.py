"""The LLM tool's body for asyncio: what `llm.chat_completion` does, awaited on an event loop.

The gateway's direct mode runs a coroutine body on its own event loop
(`throttle gateway --direct workers.tools.llm_async:chat_completion`) instead of handing a
blocking one to a thread: with `aiohttp` a call costs the gateway about a third of the CPU
of `httpx` on a thread (docs/gateway.md, "Cost"). The request, the answer's checks, the
retries and every error are `llm` and `llm_http`'s own (the same settings, THROTTLE_LLM_*,
read at each call); only the transport differs. `aiohttp` comes with the `gateway` extra.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from workers.tools import llm, llm_http
from workers.tools.llm_http import Reply, Settings


@dataclass(frozen=True)
class _Session:
    """One event loop's connections to the upstream, for one set of settings."""

    settings: Settings
    loop: asyncio.AbstractEventLoop
    pid: int
    url: str
    http: aiohttp.ClientSession


class AsyncChat:
    """`chat_completion` as a coroutine, with `aclose()` for the connections it keeps open."""

    def __init__(self) -> None:
        self._session: _Session | None = None
        self._retired: list[_Session] = []  # replaced after a change of settings; still in use

    async def __call__(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        tool_choice: str | dict[str, Any] | None = None,
        model: str | None = None,
        max_tokens: int = llm.DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """The arguments of the forced tool's call, the model and `usage`: `llm.chat_completion`."""
        name, schema, body = llm.request_for(messages, tools, tool_choice, model, max_tokens,
                                             temperature)
        return llm.read_answer(await self.post(body), name, schema, max_tokens)

    async def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """`llm_http.post_chat` over aiohttp: the same retries, answers and errors."""
        session = self._current()
        settings = session.settings
        failure = ""
        status: int | None = None
        for attempt in range(settings.max_retries + 1):
            if attempt:
                await asyncio.sleep(llm_http.backoff_s(settings.backoff_s, attempt))
            try:
                async with session.http.post(session.url, json=body) as response:
                    reply = Reply(response.status, _merged(response.raw_headers),
                                  await response.read(), response.reason or "")
            except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
                status, failure = None, llm_http.timed_out(exc, settings)
            except aiohttp.ClientError as exc:
                status, failure = None, llm_http.unreachable(exc, settings)
            else:
                answer = llm_http.outcome(reply, settings)
                if not isinstance(answer, str):
                    return answer
                status, failure = reply.status, answer
            llm_http.retrying(settings, failure, attempt)
        raise llm_http.gave_up(settings, failure, status)

    async def aclose(self) -> None:
        """Close the connections this body opened (the gateway calls it as it stops)."""
        sessions, self._session, self._retired = [*self._retired, self._session], None, []
        for session in sessions:
            if session is not None and not session.http.closed:
                await session.http.close()

    def _current(self) -> _Session:
        """This loop's session: made on first use, again after a fork, on another loop and
        when the settings change."""
        settings = Settings.from_env()
        loop = asyncio.get_running_loop()
        current = self._session
        if (current is not None and current.settings == settings and current.loop is loop
                and current.pid == os.getpid()):
            return current
        if current is not None and current.loop is loop:
            self._retired.append(current)
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.read_timeout_s,
                                        sock_connect=settings.connect_timeout_s,
                                        sock_read=settings.read_timeout_s)
        self._session = _Session(
            settings, loop, os.getpid(), settings.base_url.rstrip("/") + "/chat/completions",
            aiohttp.ClientSession(headers=settings.headers, timeout=timeout))
        return self._session


def _merged(raw: Any) -> dict[str, str]:
    """Response headers with lower-case names, repeated ones joined by ", " (as httpx does)."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


chat_completion = AsyncChat()
