"""The gateway's answers that are not a completion, in OpenAI's error format.

Every error body is `{"error": {"message", "type", "param", "code"}}` (a throttled call's
429 adds the tool's `fallback` beside it), so OpenAI clients raise their usual exception
for the status (`BadRequestError`, `RateLimitError`, ...). `failure_error` turns a call that
failed in its worker into the status and message the upstream gave.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_REFUSED = re.compile(r"refused the request \((\d{3})\)")
_ANSWERED = re.compile(r"the last answered (\d{3})\b")
_QUOTA = re.compile(r"answered 429 \(insufficient quota\)")


class ApiError(Exception):
    """An answer other than a completion: status, OpenAI error fields, extra headers and body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "api_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code}
        return {"error": error, **self.extra}


def failure_error(tool: str, failure: Any) -> ApiError:
    """The answer for a call whose task failed: Celery's stored exception, mapped.

    The LLM tool's `UpstreamError` keeps the upstream's status and message ("refused the
    request (401): ..."; "failed all 3 attempt(s); the last answered 503: ..."), which are
    passed on; a timeout or an unreachable upstream is a 504 / 502; an answer without the
    forced call (`ModelAnswerError`) a 502; any other `LLMError` or `InvalidToolCall` is
    the request's fault, a 400.
    """
    kind, args = _exception_of(failure)
    message = _message_of(kind, args)
    if kind == "InvalidToolCall":
        return ApiError(400, message, code="invalid_tool_call")
    if kind == "ModelAnswerError":
        return ApiError(502, message, type="upstream_error", code="invalid_model_answer")
    if kind == "UpstreamError":
        return _upstream_error(message, _status_arg(args))
    if kind == "LLMError":
        return ApiError(400, message, code="invalid_llm_call")
    if kind == "UpstreamBusy":
        return ApiError(429, message, code="upstream_busy", headers={"Retry-After": "1"})
    return ApiError(
        500, f"tool {tool!r} failed in its worker: {kind}: {message}; see the worker's log",
        code="tool_failed",
    )


def _upstream_error(message: str, status: int | None) -> ApiError:
    if _QUOTA.search(message):
        return ApiError(429, message, type="insufficient_quota", code="insufficient_quota")
    if status is None:
        found = _REFUSED.search(message) or _ANSWERED.search(message)
        status = int(found.group(1)) if found else None
    if status is None or status < 400:
        timed_out = "timed out" in message
        return ApiError(504 if timed_out else 502, message, type="upstream_error",
                        code="upstream_timeout" if timed_out else "upstream_unavailable")
    if status == 408:  # the upstream's own timeout: for our caller, a gateway timeout
        return ApiError(504, message, type="upstream_error", code="upstream_timeout")
    return ApiError(status, message, type=TYPES.get(status, "upstream_error"),
                    code="upstream_error")


def _exception_of(failure: Any) -> tuple[str, Sequence[Any]]:
    """(exception class name, its args) from Celery's JSON form of an exception."""
    if isinstance(failure, Mapping) and "exc_type" in failure:
        raw = failure.get("exc_message")
        args = raw if isinstance(raw, list | tuple) else [raw]
        return str(failure["exc_type"]), args
    return "Exception", [failure]


def _message_of(kind: str, args: Sequence[Any]) -> str:
    if kind == "InvalidToolCall" and len(args) == 2:
        return f"invalid call to tool {args[0]!r}: {args[1]}"
    texts = [str(arg) for arg in args if isinstance(arg, str)]
    return "; ".join(texts) or ", ".join(str(arg) for arg in args) or kind


def _status_arg(args: Sequence[Any]) -> int | None:
    """An HTTP status carried as an exception argument (an int from 100 to 599), if any."""
    for arg in args[1:]:
        if isinstance(arg, int) and not isinstance(arg, bool) and 100 <= arg <= 599:
            return arg
    return None
