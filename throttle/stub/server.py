"""The stub's HTTP side (tornado, which Flower already brings): routes and the serve loop.

  POST /v1/chat/completions   a chat completion (see `behaviour.completion`)
  GET  /v1/models             the one model the stub names
  POST /_stub/config          change settings at run time: a JSON object of StubSettings
                              fields, plus busy_for_s / fail_for_s (a window from now)
  GET  /_stub/stats           requests, statuses, tokens counted, and every request's time
  POST /_stub/reset           zero the statistics
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pydantic
import tornado.httpserver
import tornado.netutil
import tornado.web

from throttle.stub.behaviour import Stub, StubSettings, completion, error_body


class _Handler(tornado.web.RequestHandler):
    """JSON in, JSON out, over the shared `Stub`."""

    def initialize(self, stub: Stub) -> None:
        self.stub = stub

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.set_status(status)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def body_json(self) -> Any:
        try:
            return json.loads(self.request.body or b"null")
        except ValueError:
            return None


class ChatCompletions(_Handler):
    async def post(self) -> None:
        arrived = time.time()
        refusal = self.stub.refusal(self.request.headers.get("Authorization"), arrived)
        if refusal is not None:
            status, headers, body = refusal
            self.stub.record(arrived, status)
            return self.reply(status, body, headers)
        number = self.stub.stats.requests
        settings = self.stub.settings
        status, headers, body = completion(self.body_json(), settings, number)
        if status == 200 and (settings.hidden_requests or settings.hidden_tokens):
            status, headers, body = self.hidden(arrived, status, body)
        if status == 200 and settings.latency_s:
            await asyncio.sleep(settings.latency_s)
        usage = body.get("usage", {})
        self.stub.record(arrived, status, usage.get("prompt_tokens", 0),
                         usage.get("completion_tokens", 0))
        self.reply(status, body, headers)


    def hidden(self, arrived: float, status: int, body: dict[str, Any]
               ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """The answer under the hidden limits: served with their headers, or a 429."""
        settings = self.stub.settings
        tokens = int(body.get("usage", {}).get("total_tokens", 0))
        fits, headers = self.stub.hidden.check(
            arrived, tokens, settings.hidden_requests, settings.hidden_tokens,
            settings.hidden_window_s, settings.limit_headers)
        if fits:
            return status, headers, body
        return 429, headers, error_body("Rate limit reached (stub's hidden limit).", "requests",
                                    "rate_limit_exceeded")


class Models(_Handler):
    def get(self) -> None:
        model = self.stub.settings.model
        self.reply(200, {"object": "list",
                         "data": [{"id": model, "object": "model", "owned_by": "stub"}]})


class Config(_Handler):
    def get(self) -> None:
        self.reply(200, self.stub.settings.model_dump())

    def post(self) -> None:
        changes = self.body_json()
        if not isinstance(changes, dict):
            return self.reply(400, {"error": "send a JSON object of settings, e.g. "
                                             '{"busy_for_s": 3, "retry_after_s": 3}'})
        try:
            self.stub.settings = self.stub.settings.changed(changes, now_s=time.time())
        except (pydantic.ValidationError, TypeError, ValueError) as exc:
            return self.reply(400, {"error": f"invalid settings: {exc}"})
        self.reply(200, self.stub.settings.model_dump())


class Stats(_Handler):
    def get(self) -> None:
        self.reply(200, self.stub.stats.as_json())


class Reset(_Handler):
    def post(self) -> None:
        self.stub.stats = type(self.stub.stats)()
        self.reply(200, self.stub.stats.as_json())


def make_app(stub: Stub) -> tornado.web.Application:
    """The tornado application serving `stub`."""
    routes: list[Any] = [
        (r"/v1/chat/completions", ChatCompletions, {"stub": stub}),
        (r"/v1/models", Models, {"stub": stub}),
        (r"/_stub/config", Config, {"stub": stub}),
        (r"/_stub/stats", Stats, {"stub": stub}),
        (r"/_stub/reset", Reset, {"stub": stub}),
    ]
    return tornado.web.Application(routes)


def serve(settings: StubSettings, host: str, port: int, on_ready: Callable[[int], None]) -> None:
    """Serve until SIGTERM or SIGINT; `on_ready` gets the bound port (useful with port 0)."""
    asyncio.run(_serve(Stub(settings), host, port, on_ready))


async def _serve(stub: Stub, host: str, port: int, on_ready: Callable[[int], None]) -> None:
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server = tornado.httpserver.HTTPServer(make_app(stub))
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    on_ready(int(sockets[0].getsockname()[1]))
    await stop.wait()
    server.stop()
    await server.close_all_connections()
