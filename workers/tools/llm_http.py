"""HTTP to an OpenAI-compatible upstream, one `httpx.Client` per worker process.

Settings come from the worker's environment (read at each call; a change makes a new client):
  THROTTLE_LLM_BASE_URL            e.g. https://api.openai.com/v1 (default: the stub,
                                   http://127.0.0.1:8089/v1); requests go to <base>/chat/completions
  THROTTLE_LLM_API_KEY             sent as `Authorization: Bearer ...`; never logged, returned
                                   or put in an error message (it is replaced by "***")
  THROTTLE_LLM_CONNECT_TIMEOUT_S   default 5
  THROTTLE_LLM_READ_TIMEOUT_S      default 60: the longest wait for the answer
  THROTTLE_LLM_MAX_RETRIES         default 2: extra attempts after a 5xx, a timeout or a
                                   connection error, each after a backoff with jitter
  THROTTLE_LLM_BACKOFF_S           default 0.5: the first backoff; it doubles per attempt

A 429, or a 503 with a retry hint, raises `UpstreamBusy` (the worker pauses the tool or its
pool everywhere); any other 4xx raises `UpstreamError` with the upstream's message at once.
Every answer's headers go to `throttle.report_headers` (adaptive limits learn from them).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from throttle.adaptive import report_headers
from throttle.errors import ThrottleError, UpstreamBusy
from throttle.store import mask_url
from workers.tools.retry_hints import pause_s

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8089/v1"
DEFAULT_PAUSE_S = 1.0  # a 429 that names no pause
MAX_PAUSE_S = 3600.0  # no upstream hint pauses a tool longer than this
MAX_BACKOFF_S = 10.0
MESSAGE_CHARS = 500  # upstream messages are cut to this length
ENV_NAMES = ("THROTTLE_LLM_BASE_URL", "THROTTLE_LLM_API_KEY", "THROTTLE_LLM_CONNECT_TIMEOUT_S",
             "THROTTLE_LLM_READ_TIMEOUT_S", "THROTTLE_LLM_MAX_RETRIES", "THROTTLE_LLM_BACKOFF_S")


class LLMError(ThrottleError):
    """The LLM tool could not produce an answer; the message says why and what to check."""


class UpstreamError(LLMError):
    """The upstream refused the request (4xx) or kept failing (5xx, timeouts) past the retries.

    `status` is the upstream's last HTTP status (None after timeouts or connection errors),
    kept as the second argument so it survives Celery's JSON result.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, status)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Settings:
    """Where and how this process calls the upstream (read from the environment)."""

    base_url: str
    api_key: str = field(repr=False)
    connect_timeout_s: float
    read_timeout_s: float
    max_retries: int
    backoff_s: float

    @classmethod
    def from_env(cls) -> Settings:
        """The settings the environment holds now (parsed again only when it changed)."""
        return _settings_for(tuple(os.environ.get(name) for name in ENV_NAMES))

    @property
    def headers(self) -> dict[str, str]:
        """The headers of every request: JSON answers, and the API key when one is set."""
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @property
    def where(self) -> str:
        """The base URL for messages (any password in it masked)."""
        return mask_url(self.base_url)

    def redact(self, text: str) -> str:
        """`text` without the API key, cut to a readable length."""
        if self.api_key:
            text = text.replace(self.api_key, "***")
        return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."


@functools.lru_cache(maxsize=8)
def _settings_for(raw: tuple[str | None, ...]) -> Settings:
    """Settings from the values of ENV_NAMES (an error is raised again at each call)."""
    values = dict(zip(ENV_NAMES, raw, strict=True))
    return Settings(
        base_url=values["THROTTLE_LLM_BASE_URL"] or DEFAULT_BASE_URL,
        api_key=_api_key(values["THROTTLE_LLM_API_KEY"] or ""),
        connect_timeout_s=_number("THROTTLE_LLM_CONNECT_TIMEOUT_S", values, 5.0),
        read_timeout_s=_number("THROTTLE_LLM_READ_TIMEOUT_S", values, 60.0),
        max_retries=int(_number("THROTTLE_LLM_MAX_RETRIES", values, 2)),
        backoff_s=_number("THROTTLE_LLM_BACKOFF_S", values, 0.5),
    )


def _api_key(raw: str) -> str:
    """The key without surrounding blanks; refused (never shown) if a header cannot hold it."""
    key = raw.strip()
    if not all(" " < char < "\x7f" for char in key):
        raise LLMError("THROTTLE_LLM_API_KEY holds spaces or characters an HTTP header cannot "
                       "carry; check the value set in the worker's environment (not shown)")
    return key


def _number(name: str, values: Mapping[str, str | None], default: float) -> float:
    raw = values[name]
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LLMError(f"{name}={raw!r} is not a number; set it to e.g. {default:g}") from None
    if not value >= 0:
        raise LLMError(f"{name}={raw!r} must be zero or more")
    return value


class _Upstream:
    """This process's settings and client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = httpx.Client(
            base_url=self.settings.base_url.rstrip("/") + "/",
            headers=self.settings.headers,
            timeout=httpx.Timeout(
                self.settings.read_timeout_s, connect=self.settings.connect_timeout_s
            ),
        )
        self.pid = os.getpid()


_upstream: _Upstream | None = None
_making = threading.Lock()  # threads arriving together make one client (each costs ~50 ms)


def upstream() -> _Upstream:
    """The process's upstream client: created on first use, again after a fork (a client's
    connections must not be shared across processes) and when the settings change."""
    global _upstream
    settings = Settings.from_env()
    current = _upstream
    if current is not None and current.pid == os.getpid() and current.settings == settings:
        return current
    with _making:
        current = _upstream
        if current is None or current.pid != os.getpid() or current.settings != settings:
            # The old client is not closed: another thread of this process may still use it.
            current = _upstream = _Upstream(settings)
    return current


def post_chat(body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` to <base>/chat/completions; the parsed answer, or an error that says why.

    5xx answers, timeouts and connection errors are retried up to THROTTLE_LLM_MAX_RETRIES
    times with exponential backoff and jitter.
    """
    current = upstream()
    settings = current.settings
    attempts = settings.max_retries + 1
    failure = ""
    status: int | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s(settings.backoff_s, attempt))
        try:
            response = current.client.post("chat/completions", json=body)
        except httpx.TimeoutException as exc:
            status, failure = None, timed_out(exc, settings)
        except httpx.TransportError as exc:
            status, failure = None, unreachable(exc, settings)
        else:
            reply = Reply(response.status_code, response.headers, response.content,
                          response.reason_phrase)
            answer = outcome(reply, settings)
            if not isinstance(answer, str):
                return answer
            status, failure = reply.status, answer
        retrying(settings, failure, attempt)
    raise gave_up(settings, failure, status)


@dataclass(frozen=True, slots=True)
class Reply:
    """An upstream's answer, whichever HTTP client read it (`llm_async` reads with aiohttp)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    reason: str

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def outcome(reply: Reply, settings: Settings) -> dict[str, Any] | str:
    """The parsed answer of a 2xx or 3xx, what failed for an answer worth retrying (5xx, 408),
    or raise: UpstreamBusy for a pause request, UpstreamError for any other refusal. The
    headers go to the adaptive limits first."""
    report_headers(reply.headers, status=reply.status)
    if reply.status < 400:
        return _json_of(reply, settings)
    _raise_if_final(reply, settings)
    return f"answered {reply.status}: {_message_of(reply, settings)}"


def timed_out(exc: BaseException, settings: Settings) -> str:
    return (f"timed out ({type(exc).__name__}; read timeout {settings.read_timeout_s:g}s, "
            f"connect {settings.connect_timeout_s:g}s)")


def unreachable(exc: BaseException, settings: Settings) -> str:
    return f"could not be reached ({type(exc).__name__}: {settings.redact(str(exc))})"


def retrying(settings: Settings, failure: str, attempt: int) -> None:
    logger.warning("LLM upstream %s %s (attempt %d of %d)", settings.where, failure,
                   attempt + 1, settings.max_retries + 1)


def gave_up(settings: Settings, failure: str, status: int | None) -> UpstreamError:
    return UpstreamError(
        f"the LLM upstream at {settings.where} failed all {settings.max_retries + 1} "
        f"attempt(s); the last {failure}. Check that it runs and answers at "
        "THROTTLE_LLM_BASE_URL, or raise THROTTLE_LLM_READ_TIMEOUT_S / THROTTLE_LLM_MAX_RETRIES",
        status,
    )


def backoff_s(base_s: float, attempt: int) -> float:
    """Exponential backoff with jitter: base x 2^(attempt-1), times 0.5 to 1.5."""
    return min(MAX_BACKOFF_S, base_s * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def _raise_if_final(response: Reply, settings: Settings) -> None:
    """Raise for a pause request (429, or 503 with a hint) and for other 4xx; else return."""
    status = response.status
    message = _message_of(response, settings)
    if status in (429, 503):
        hint_s = pause_s(response.headers)
        if status == 429 and _error_code(response) == "insufficient_quota":
            raise UpstreamError(
                f"the LLM upstream at {settings.where} answered 429 (insufficient quota): "
                f"{message}; check the account's plan and billing",
                status,
            )
        if hint_s is not None or status == 429:
            pause = min(MAX_PAUSE_S, DEFAULT_PAUSE_S if hint_s is None else hint_s)
            raise UpstreamBusy(pause, f"the LLM upstream answered {status}: {message}")
    if 400 <= status < 500 and status != 408:
        fix = ("check THROTTLE_LLM_API_KEY in the worker's environment"
               if status in (401, 403) else "check the call's arguments and model")
        raise UpstreamError(
            f"the LLM upstream at {settings.where} refused the request ({status}): "
            f"{message}; {fix}",
            status,
        )


def _json_of(response: Reply, settings: Settings) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise UpstreamError(
            f"the LLM upstream at {settings.where} answered {response.status} without a "
            f"JSON object ({settings.redact(response.text[:200])!r}); check that "
            "THROTTLE_LLM_BASE_URL is an OpenAI-compatible API (it usually ends in /v1)"
        )
    return answer


def _error_body(response: Reply) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def _error_code(response: Reply) -> str | None:
    error = _error_body(response)
    code = error.get("code") if isinstance(error, dict) else None
    return str(code) if code is not None else None


def _message_of(response: Reply, settings: Settings) -> str:
    """The upstream's error message (OpenAI's `error.message`, else the body), key removed."""
    error = _error_body(response)
    if isinstance(error, dict) and error.get("message"):
        text = str(error["message"])
    elif isinstance(error, str):
        text = error
    else:
        text = response.text.strip() or response.reason
    return settings.redact(text.strip().rstrip("."))
