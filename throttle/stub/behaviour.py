"""What the stub answers: its settings, its statistics, and the answers themselves.

No HTTP here (see `server`): each function takes a parsed request and returns a status,
headers and a JSON body, so the behaviour reads top to bottom.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from throttle.stub.hidden import HiddenLimits, go_duration
from throttle.stub.values import minimal_value
from throttle.tokens import compact_json, prompt_tokens, text_tokens

LOG_MAX = 100_000  # requests remembered with their time
DEFAULT_MAX_TOKENS = 4096

Reply = tuple[int, dict[str, str], dict[str, Any]]


class StubSettings(BaseModel):
    """How the stub behaves; every field can be changed at run time (POST /_stub/config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "stub-1"
    latency_s: float = Field(default=0.0, ge=0, le=600)
    api_key: str = ""  # when set, any other key gets a 401 that echoes it, as upstreams do
    busy_every: int = Field(default=0, ge=0)  # every Nth request answers 429
    busy_next: int = Field(default=0, ge=0)  # the next N requests answer 429
    busy_until: float = 0.0  # requests before this Unix time answer 429
    retry_after_s: float = Field(default=1.0, ge=0, le=86_400)
    retry_style: Literal["seconds", "ms", "date", "reset"] = "seconds"
    fail_every: int = Field(default=0, ge=0)  # every Nth request answers fail_status
    fail_next: int = Field(default=0, ge=0)
    fail_until: float = 0.0
    fail_status: int = Field(default=500, ge=400, le=599)
    answer: Literal["tool_call", "text", "bad_json", "invalid"] = "tool_call"
    # Hidden limits (throttle/stub/hidden.py): 0 for none; 429 past them.
    hidden_requests: int = Field(default=0, ge=0)  # requests per hidden window
    hidden_tokens: int = Field(default=0, ge=0)  # tokens per hidden window
    hidden_window_s: float = Field(default=60.0, gt=0, le=86_400)
    limit_headers: Literal["openai", "anthropic", "none"] = "none"  # how answers report them

    def changed(self, changes: dict[str, Any], *, now_s: float) -> StubSettings:
        """These settings with `changes`; `busy_for_s` / `fail_for_s` set a window from now."""
        update = dict(changes)
        for kind in ("busy", "fail"):
            if f"{kind}_for_s" in update:
                update[f"{kind}_until"] = now_s + float(update.pop(f"{kind}_for_s"))
        return StubSettings.model_validate({**self.model_dump(), **update})


@dataclass
class Stats:
    """What the stub has seen since it started (or was reset)."""

    requests: int = 0
    authorized: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LOG_MAX))

    def as_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("statuses", "log")},
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "log": list(self.log),
        }


class Stub:
    """The stub's state: settings and statistics, shared by its request handlers."""

    def __init__(self, settings: StubSettings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.hidden = HiddenLimits()

    def refusal(self, authorization: str | None, now_s: float) -> Reply | None:
        """Count a request; a 401, 429 or failure status when the settings call for one."""
        self.stats.requests += 1
        number, settings = self.stats.requests, self.settings
        if settings.api_key and authorization != f"Bearer {settings.api_key}":
            presented = (authorization or "").removeprefix("Bearer ")
            return 401, {}, error_body(f"Incorrect API key provided: {presented}.",
                                   "invalid_request_error", "invalid_api_key")
        self.stats.authorized += 1
        if _due(number, settings.busy_every, settings.busy_next, settings.busy_until, now_s):
            if settings.busy_next:
                self.settings = settings.model_copy(update={"busy_next": settings.busy_next - 1})
            wait = settings.retry_after_s
            return 429, pause_headers(wait, settings.retry_style, now_s), error_body(
                f"Rate limit reached (stub). Please try again in {wait:g}s.", "requests",
                "rate_limit_exceeded")
        if _due(number, settings.fail_every, settings.fail_next, settings.fail_until, now_s):
            if settings.fail_next:
                self.settings = settings.model_copy(update={"fail_next": settings.fail_next - 1})
            return settings.fail_status, {}, error_body(
                "The server had an error while processing your request (stub).", "server_error")
        return None

    def record(self, now_s: float, status: int, prompt: int = 0, completion: int = 0) -> None:
        """Note a request's outcome and, when served, the tokens it used."""
        self.stats.statuses[status] += 1
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        self.stats.log.append({"at": now_s, "status": status, "prompt_tokens": prompt,
                               "completion_tokens": completion})


def _due(number: int, every: int, next_n: int, until: float, now_s: float) -> bool:
    return next_n > 0 or (every > 0 and number % every == 0) or now_s < until


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def pause_headers(wait_s: float, style: str, now_s: float) -> dict[str, str]:
    """Headers asking for a pause of `wait_s`, in one of the styles upstreams use."""
    if style == "ms":
        return {"retry-after-ms": f"{wait_s * 1000:.0f}"}
    if style == "date":
        return {"Retry-After": email.utils.formatdate(now_s + wait_s, usegmt=True)}
    if style == "reset":
        return {"x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": go_duration(wait_s),
                "x-ratelimit-remaining-tokens": "1000",
                "x-ratelimit-reset-tokens": "1ms"}
    return {"Retry-After": str(math.ceil(wait_s))}


def completion(body: Any, settings: StubSettings, number: int) -> Reply:
    """The chat completion for a request body: a call of the forced tool, or a 400."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) \
            or not body["messages"] or not isinstance(body.get("model"), str):
        return 400, {}, error_body("expected a JSON object with 'model' and a non-empty "
                               "'messages' list", "invalid_request_error")
    tools = body.get("tools") or []
    prompt = prompt_tokens(body["messages"], tools)
    limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS)
    try:
        name, schema = _forced(tools, body.get("tool_choice"))
    except ValueError as exc:
        return 400, {}, error_body(str(exc), "invalid_request_error")
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if name is None or settings.answer == "text":
        message["content"] = "This is the stub's answer."
        text, finish = message["content"], "stop"
    else:
        try:
            text = _arguments(name, schema, settings.answer)
        except ValueError as exc:
            return 400, {}, error_body(str(exc), "invalid_request_error")
        finish = "tool_calls"
        if text_tokens(text) > limit:
            text, finish = text[: limit * 4], "length"
        message["tool_calls"] = [{"id": f"call_stub_{number}", "type": "function",
                                  "function": {"name": name, "arguments": text}}]
    used = min(limit, text_tokens(text))
    return 200, {}, {
        "id": f"chatcmpl-stub-{number}", "object": "chat.completion", "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": used,
                  "total_tokens": prompt + used},
    }


def _forced(tools: list[Any], choice: Any) -> tuple[str | None, Any]:
    """The tool the request forces (or the first one for "auto" / "required") and its schema."""
    by_name = {t.get("function", {}).get("name"): t.get("function", {}).get("parameters", {})
               for t in tools if isinstance(t, dict)}
    if not by_name or choice == "none":
        return None, None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        name = next(iter(by_name))
    if name not in by_name:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return name, by_name[name] or {"type": "object"}


def _arguments(name: str, schema: Any, answer: str) -> str:
    """The JSON arguments of the tool call, valid against `schema` unless told otherwise."""
    if answer == "bad_json":
        return '{"unfinished": '
    if answer == "invalid":
        return "{}" if schema.get("required") else "null"
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"the parameters of {name!r} are not a JSON Schema: {exc.message}") \
            from None
    value = minimal_value(schema)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema)
                                             .iter_errors(value))
    if error is not None:
        raise ValueError(f"the stub cannot make arguments valid against the schema of "
                         f"{name!r} ({error.message}); give the property `examples`")
    return compact_json(value)
