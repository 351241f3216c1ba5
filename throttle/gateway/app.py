"""The HTTP side: FastAPI routes over one `Gateway`.

  POST /v1/chat/completions   an OpenAI chat completion, gated by a throttle tool
  GET  /metrics               Prometheus text (see `throttle.gateway.metrics`)
  GET  /healthz               200 when the gate's Redis, the result backend and the broker
                              answer, else 503 naming what failed

The caller's Authorization header is checked against THROTTLE_GATEWAY_KEYS (when set); the
tenant its key is bound to keys the call's limits. The key goes no further: not into the
call's arguments, a log line or an error message.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from throttle import reload as config_reload
from throttle.gateway.callers import KEYS_VARIABLE, LOCAL_TENANT
from throttle.gateway.chat import read_call
from throttle.gateway.errors import ApiError
from throttle.gateway.metrics import GatewayMetrics
from throttle.gateway.service import Gateway
from throttle.gateway.settings import GatewaySettings

logger = logging.getLogger("throttle.gateway")

CHAT_PATH = "/v1/chat/completions"
DEADLINE_HEADER = b"x-throttle-max-delay"
# The request headers the chat route reads (names as ASGI servers give them: lower case).
READ_HEADERS = frozenset({b"authorization", DEADLINE_HEADER, b"content-length"})
JSON_TYPE = (b"content-type", b"application/json")
# Bodies encoded as Starlette's JSONResponse encodes them (one encoder, built once).
BODY_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
# Deeper bodies are refused before anything walks them (a schema check, pickling, a log). A
# message's content parts sit 4 levels deep and a tool's parameters 4 plus their own nesting.
MAX_BODY_DEPTH = 64


def make_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI app; it connects to Redis when the server starts it (lifespan)."""
    gateway = Gateway(settings)
    metrics = GatewayMetrics(lambda: gateway.waiter.watched)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        config_reload.install(gateway.reload, "gateway")
        try:
            yield
        finally:
            await gateway.close()

    app = GatewayApp(title="throttle gateway", lifespan=lifespan, docs_url=None,
                     redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.state.metrics = metrics

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        message = {404: "no such route; the gateway serves POST /v1/chat/completions, "
                        "GET /metrics and GET /healthz",
                   405: "method not allowed on this route; chat completions are POSTed to "
                        "/v1/chat/completions"}.get(exc.status_code, str(exc.detail))
        metrics.observe(None, exc.status_code, 0.0)
        return error_response(ApiError(exc.status_code, message, code="not_found"
                                       if exc.status_code == 404 else None))

    async def chat_completions(scope: Scope, receive: Receive) -> Encoded:
        started = time.perf_counter()
        tool: str | None = None
        try:
            headers = request_headers(scope)
            tenant = tenant_of(headers.get(b"authorization"), settings)
            deadline_s = read_deadline(headers.get(DEADLINE_HEADER))
            body = await read_json(receive, headers.get(b"content-length"),
                                   settings.max_body_bytes)
            call = read_call(body, gateway.config, settings.default_tool, tenant)
            tool = call.tool
            answer = await gateway.complete(call, deadline_s)
            encoded = encode_answer(answer.status, answer.body, answer.headers)
        except ApiError as error:
            encoded = encode_error(error)
        except Exception:
            logger.exception("gateway: a request failed unexpectedly")
            encoded = encode_error(ApiError(500, "the gateway failed unexpectedly; see its log",
                                            code="internal_error"))
        metrics.observe(tool, encoded[0], time.perf_counter() - started,
                        fallback_reason(encoded[1]))
        return encoded

    # POST /v1/chat/completions is served by ChatRoute in front of the app (GatewayApp);
    # the route stays declared so that other methods on the path answer 405.
    app.post(CHAT_PATH)(_served_by_chat_route)
    app.chat_handler = chat_completions

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        checks = await gateway.health()
        healthy = all(answer == "ok" for answer in checks.values())
        return JSONResponse({"status": "ok" if healthy else "unavailable", "checks": checks},
                            200 if healthy else 503)

    return app


# An encoded answer: status, raw headers and body, as the ASGI messages carry them.
Encoded = tuple[int, list[tuple[bytes, bytes]], bytes]


class GatewayApp(FastAPI):
    """FastAPI with `ChatRoute` in front of its whole middleware stack: the chat handler
    answers every error itself, so its calls skip the error, telemetry and body-limit layers
    too (ServerErrorMiddleware wraps each `send`)."""

    chat_handler: Callable[[Scope, Receive], Awaitable[Encoded]] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.chat_handler is None else ChatRoute(stack, self.chat_handler)


class ChatRoute:
    """ASGI middleware: a POST to /v1/chat/completions goes straight to its handler, past
    FastAPI's router, route and dependency layers and Starlette's request and response
    objects (the handler reads the ASGI messages and answers with encoded ones); every
    other request, that path's other methods included, goes through the app."""

    def __init__(self, app: ASGIApp,
                 handler: Callable[[Scope, Receive], Awaitable[Encoded]]) -> None:
        self.app, self.handler = app, handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == CHAT_PATH):
            status, headers, body = await self.handler(scope, receive)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:
            await self.app(scope, receive, send)


async def _served_by_chat_route() -> None:
    raise RuntimeError("POST /v1/chat/completions is served by ChatRoute (GatewayApp)")


def encode_answer(status: int, body: Any, headers: Mapping[str, str]) -> Encoded:
    """An answer as Starlette's JSONResponse(body, status, headers) sends it, built directly:
    the body encoded once, the header names in lower case, then content-length and type
    (`headers` are the gateway's own: X-Throttle-*, Retry-After, x-ratelimit-*)."""
    encoded = BODY_JSON.encode(body).encode()
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
           for name, value in headers.items()]
    raw.append((b"content-length", str(len(encoded)).encode()))
    raw.append(JSON_TYPE)
    return status, raw, encoded


def encode_error(error: ApiError) -> Encoded:
    return encode_answer(error.status, error.body(), error.headers)


def error_response(error: ApiError) -> Response:
    status, headers, body = encode_error(error)
    response = Response(body, status)
    response.raw_headers = headers
    return response


def fallback_reason(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The X-Throttle-Fallback-Reason an encoded answer carries, if any."""
    for name, value in headers:
        if name == b"x-throttle-fallback-reason":
            return value.decode("latin-1")
    return None


def request_headers(scope: Scope) -> dict[bytes, str]:
    """The request headers the chat route reads, by lower-case name (the first of each)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in READ_HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found


def tenant_of(header: str | None, settings: GatewaySettings) -> str:
    """The tenant the request's key is bound to; 401 unless it carries a configured key
    (no key configured: every caller is tenant `local`)."""
    if settings.callers.open:
        return LOCAL_TENANT
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "no API key: send 'Authorization: Bearer <key>' with a key the "
                       f"gateway accepts (listed in its {KEYS_VARIABLE})",
                       code="missing_api_key")
    tenant = settings.callers.tenant_of(token.strip())
    if tenant is None:
        raise ApiError(401, "the API key sent is not one the gateway accepts (it is not "
                       f"shown); use a key listed in the gateway's {KEYS_VARIABLE}",
                       code="invalid_api_key")
    return tenant


def read_deadline(raw: str | None) -> float | None:
    """A caller's tighter deadline in seconds (header X-Throttle-Max-Delay), if sent."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ApiError(400, f"X-Throttle-Max-Delay {raw[:40]!r} is not a number of seconds "
                       "(0 or more); send e.g. 'X-Throttle-Max-Delay: 5' or leave it out",
                       code="invalid_header")
    return value


async def read_json(receive: Receive, declared: str | None, limit_bytes: int) -> Any:
    """The request's JSON body; 413 past `limit_bytes` (`declared` in Content-Length, or
    streamed), 400 if unreadable."""
    too_large = ApiError(413, f"the request body is larger than the gateway's limit of "
                         f"{limit_bytes} bytes; send a shorter conversation, or start the "
                         "gateway with a higher --max-body-bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    raw = await read_body(receive, limit_bytes, too_large)
    if not raw:
        raise ApiError(400, "the request has no body; send a JSON chat-completions request "
                       "(messages, tools, tool_choice)", code="invalid_json")
    try:
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:  # nested past Python's own limit
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object "
                       "with Content-Type: application/json", code="invalid_json") from None
    if nesting_depth(body) > MAX_BODY_DEPTH:
        raise _too_deep()
    return body


async def read_body(receive: Receive, limit_bytes: int, too_large: ApiError) -> bytes:
    """The request's body from its ASGI messages; `too_large` past `limit_bytes`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise too_large
        if not message.get("more_body", False):
            return b"".join((*chunks, chunk)) if chunks else chunk
        chunks.append(chunk)


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body nests arrays and objects more than "
                    f"{MAX_BODY_DEPTH} levels deep; flatten it (no chat request needs that "
                    "many)", code="too_deep")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a 64-bit float; send a finite number")
    return value


# Requests are decoded as json.loads(raw, parse_constant=, parse_float=) decodes them, with
# one decoder built once instead of one per request.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def nesting_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar: 0), level by
    level without recursion, so no depth can exhaust the stack (counted up to one past
    MAX_BODY_DEPTH)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_BODY_DEPTH:
            return depth
        inner = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, dict | list):
                    inner.append(child)
        level = inner
    return depth
