"""OpenAI chat-completions requests in, throttled calls out, and their answers back.

Which throttle tool gates a request (docs/gateway.md, "Which tool"):
  - `tool_choice` forces function N, and N is a configured tool that takes chat-completion
    arguments (its params declare `messages`): that tool, with its own limits and queue;
  - any other request (N is not configured, or is a tool of another kind such as
    `search_products`, whose task would run the search instead of asking the model; or no
    tool is forced): the default tool (`--default-tool`, `chat_completion`).
Forcing a function that the request's `tools` do not define is a 400 (`unknown_tool`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from throttle.config import Config
from throttle.gateway.callers import LOCAL_TENANT, session_of
from throttle.gateway.errors import ApiError

# Request fields that become the task's keyword arguments (max_completion_tokens, the newer
# name, is sent as max_tokens). `session_id` and `tenant` come from the caller's key, the
# request's `user` only narrowing session_id (throttle.gateway.callers). Other OpenAI fields
# are not forwarded (docs/gateway.md).
FORWARDED = ("messages", "tools", "tool_choice", "model", "max_tokens", "temperature")
UNFORCED = (None, "auto", "required")
MAX_USER_CHARS = 128
FORCE_EXAMPLE = '{"type": "function", "function": {"name": "<tool>"}}'
ARGUMENTS_JSON = json.JSONEncoder(separators=(",", ":"))  # a tool call's arguments, compact


@dataclass(frozen=True)
class ChatCall:
    """One request as a throttled call: the tool that gates it and the task's arguments."""

    tool: str
    kwargs: dict[str, Any]
    forced: str | None


def read_call(body: Any, config: Config, default_tool: str,
              tenant: str = LOCAL_TENANT) -> ChatCall:
    """The throttled call for a parsed request body from `tenant` (the one its key proves),
    or an ApiError (400) saying what to fix."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with messages, tools and "
                       f"tool_choice, e.g. {{\"messages\": [...], \"tools\": [...], "
                       f"\"tool_choice\": {FORCE_EXAMPLE}}}", code="invalid_body")
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported: the gateway answers once the "
                       "throttled call has run; send stream=false", param="stream",
                       code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n={body.get('n')!r} is not supported: the gateway asks for one "
                       "answer per request; send n=1 or leave it out", param="n",
                       code="unsupported_parameter")
    forced = forced_name(body.get("tool_choice"))
    names = _tool_names(body.get("tools"))
    if forced is not None and names is not None and forced not in names:
        raise ApiError(400, f"tool_choice forces {forced!r}, which is not one of the "
                       f"request's tools {names}; add its definition to tools or force one "
                       "of them", param="tool_choice", code="unknown_tool")
    if forced is None and names is not None and len(names) > 1:
        raise ApiError(400, f"tool_choice {body.get('tool_choice')!r} leaves the model to "
                       f"choose among {len(names)} tools, but the gateway answers with one "
                       f"forced tool call: set tool_choice to {FORCE_EXAMPLE}",
                       param="tool_choice", code="tool_choice_required")
    kwargs = {name: body[name] for name in FORWARDED if body.get(name) is not None}
    if "max_tokens" not in kwargs and body.get("max_completion_tokens") is not None:
        kwargs["max_tokens"] = body["max_completion_tokens"]
    if forced is None:
        kwargs.pop("tool_choice", None)  # the tool forces the only tool offered
    else:
        kwargs["tool_choice"] = {"type": "function", "function": {"name": forced}}
    tool = config.tools.get(forced or "")
    if tool is None or not tool.takes_chat:
        tool = config.tool(default_tool)
    user = body.get("user")
    if user is not None and not (isinstance(user, str) and len(user) <= MAX_USER_CHARS):
        raise ApiError(400, f"user must be a string of at most {MAX_USER_CHARS} characters "
                       f"(your end-user's id), got {json.dumps(user)[:80]}; send a shorter "
                       "string or leave it out", param="user", code="invalid_user")
    declared = tool.params.get("properties", {})
    if "session_id" in declared:  # keys per-session limits: the key's tenant, then `user`
        kwargs["session_id"] = session_of(tenant, user)
    if "tenant" in declared:  # keys per-tenant limits, which no `user` escapes
        kwargs["tenant"] = tenant
    return ChatCall(tool=tool.name, kwargs=kwargs, forced=forced)


def forced_name(tool_choice: Any) -> str | None:
    """The function a `tool_choice` forces; None for "auto", "required" or none given."""
    if tool_choice in UNFORCED:
        return None
    if tool_choice == "none":
        raise ApiError(400, "tool_choice 'none' asks for an answer without a tool call, but "
                       f"the gateway answers only with tool calls: set tool_choice to "
                       f"{FORCE_EXAMPLE}", param="tool_choice", code="unsupported_parameter")
    if isinstance(tool_choice, str) and tool_choice:
        return tool_choice  # a bare name, as the LLM tool accepts it
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return name
    raise ApiError(400, f"tool_choice must be \"auto\", \"required\" or {FORCE_EXAMPLE}; got "
                   f"{json.dumps(tool_choice)[:200]}", param="tool_choice",
                   code="invalid_tool_choice")


def _tool_names(tools: Any) -> list[str] | None:
    """The function names a request's `tools` define (None when it has no list of tools:
    the tool's schema says what is missing)."""
    if not isinstance(tools, list):
        return None
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            names.append(name)
    return names


def completion(result: Any, *, task_id: str, created: int) -> dict[str, Any]:
    """The OpenAI chat.completion for a chat tool's result (one call of the forced tool)."""
    if not (isinstance(result, dict) and isinstance(result.get("tool"), str)
            and isinstance(result.get("arguments"), dict)):
        raise ApiError(502, "the tool's worker returned a result that is not a tool call "
                       "(no 'tool' and 'arguments'); route chat requests to a chat tool such "
                       "as chat_completion", type="upstream_error", code="invalid_tool_result")
    compact = task_id.replace("-", "")
    return {
        "id": f"chatcmpl-{compact}",
        "object": "chat.completion",
        "created": created,
        "model": str(result.get("model") or ""),
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [{
                    "id": f"call_{compact[:24]}",
                    "type": "function",
                    "function": {
                        "name": result["tool"],
                        "arguments": ARGUMENTS_JSON.encode(result["arguments"]),
                    },
                }],
            },
            "logprobs": None,
            "finish_reason": str(result.get("finish_reason") or "tool_calls"),
        }],
        "usage": result.get("usage"),
    }
