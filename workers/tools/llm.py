"""The LLM tool: one chat completion that must answer with a call of the forced tool.

`chat_completion` sends the conversation, the tool definitions and a `tool_choice` forcing
one of them to an OpenAI-compatible upstream (see `llm_http` for the settings), then checks
the answer: a call of that tool whose arguments are JSON valid against its schema. It
returns the arguments with the upstream's `usage`.

Tokens are the tool's cost: `estimate_tokens` (the config's `cost`) charges prompt
characters / 4 plus `max_tokens` before the call, and `used_tokens` (its `settle`) corrects
the charge from `usage` afterwards. Importing this module has no side effects: the config
loader imports it for those two functions.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from throttle.schema_check import SchemaCheck
from throttle.tokens import prompt_tokens
from workers.tools.llm_http import LLMError, post_chat

DEFAULT_MAX_TOKENS = 256


class ModelAnswerError(LLMError):
    """The model did not call the forced tool, or its arguments do not fit the tool's schema."""


def chat_completion(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    tool_choice: str | dict[str, Any] | None = None,
    model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    session_id: str | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Ask the model for a call of the forced tool; its arguments, the model and `usage`.

    `tool_choice` names the tool to force (a name, or OpenAI's `{"type": "function",
    "function": {"name": ...}}`); it may be left out when `tools` holds exactly one.
    `model` defaults to THROTTLE_LLM_MODEL. `session_id` and `tenant` only key the limits.
    """
    name, schema, body = request_for(messages, tools, tool_choice, model, max_tokens,
                                     temperature)
    return read_answer(post_chat(body), name, schema, max_tokens)


def request_for(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any,
    model: str | None, max_tokens: int, temperature: float | None,
) -> tuple[str, SchemaCheck, dict[str, Any]]:
    """The forced tool's name, its checked parameter schema and the chat-completions request
    body."""
    name = forced_tool(tools, tool_choice)
    schema = _schema_of(tools, name)
    body: dict[str, Any] = {
        "model": model or _default_model(),
        "messages": messages,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": name}},
        "max_tokens": max_tokens,
    }
    if temperature is not None:
        body["temperature"] = temperature
    return name, schema, body


def estimate_tokens(arguments: Mapping[str, Any]) -> int:
    """The cost charged before the call: prompt tokens (chars / 4) plus `max_tokens`."""
    prompt = prompt_tokens(arguments.get("messages") or [], arguments.get("tools") or [])
    return prompt + int(arguments.get("max_tokens") or DEFAULT_MAX_TOKENS)


def used_tokens(arguments: Mapping[str, Any], result: Mapping[str, Any]) -> int:
    """The cost settled after the call: the upstream's `usage.total_tokens`."""
    return int(result["usage"]["total_tokens"])


def forced_tool(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> str:
    """The name of the tool the call forces; an LLMError when it names none of `tools`."""
    names = [str(tool.get("function", {}).get("name")) for tool in tools]
    if tool_choice is None:
        if len(names) != 1:
            raise LLMError(
                f"tool_choice is missing and tools holds {len(names)} tools; name the one to "
                "force, e.g. tool_choice='" + (names[0] if names else "my_tool") + "'"
            )
        return names[0]
    name = tool_choice
    if isinstance(tool_choice, Mapping):
        name = tool_choice.get("function", {}).get("name")
    if name not in names:
        raise LLMError(f"tool_choice {name!r} is not one of the tools {names}; force one of them")
    return str(name)


def read_answer(
    answer: Mapping[str, Any], name: str, schema: Mapping[str, Any] | SchemaCheck,
    max_tokens: int,
) -> dict[str, Any]:
    """The tool's result from a chat-completions answer, or a ModelAnswerError saying why not
    (`schema`: the tool's parameters, or their check from `request_for`)."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ModelAnswerError("the upstream's answer has no choices; is it a chat completion?")
    choice = choices[0]
    finish = str(choice.get("finish_reason") or "")
    message = choice.get("message")
    listed = message.get("tool_calls") if isinstance(message, dict) else None
    calls = [c for c in listed or [] if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    call = next((c for c in calls if c["function"].get("name") == name), None)
    if call is None:
        said = [c["function"].get("name") for c in calls] or "no tool call"
        raise ModelAnswerError(
            f"the model did not call the forced tool {name!r} (it answered with {said}, "
            f"finish_reason {finish!r}); check that the model supports forced tool calls"
        )
    raw = call["function"].get("arguments") or ""
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        cut = " (cut at max_tokens: raise max_tokens)" if finish == "length" else ""
        raise ModelAnswerError(
            f"the model's arguments for {name!r} are not valid JSON{cut}: {exc}; "
            f"max_tokens was {max_tokens}"
        ) from None
    check = schema if isinstance(schema, SchemaCheck) else _validator(_canonical(schema))
    error = check.first_error(arguments, parsed=isinstance(raw, str))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "arguments"
        raise ModelAnswerError(
            f"the model's arguments for {name!r} break the tool's schema at {where}: "
            f"{error.message}"
        )
    return {
        "source": "llm",
        "tool": name,
        "arguments": arguments,
        "model": str(answer.get("model") or ""),
        "finish_reason": finish,
        "usage": _usage(answer),
    }


def _usage(answer: Mapping[str, Any]) -> dict[str, int]:
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        raise ModelAnswerError("the upstream's answer has no usage; its tokens cannot be settled")
    try:
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        total = int(usage.get("total_tokens", prompt + completion))
    except (KeyError, TypeError, ValueError):
        raise ModelAnswerError(f"the upstream's usage is incomplete: {usage!r}") from None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _schema_of(tools: Sequence[Mapping[str, Any]], name: str) -> SchemaCheck:
    """The forced tool's parameter schema, checked before any token is spent on it."""
    function = next(
        tool.get("function", {}) for tool in tools if tool.get("function", {}).get("name") == name
    )
    schema: Mapping[str, Any] = function.get("parameters") or {"type": "object"}
    try:
        return _validator(_canonical(schema))
    except jsonschema.SchemaError as exc:
        raise LLMError(
            f"the parameters of tool {name!r} are not a valid JSON Schema: {exc.message}"
        ) from None


def _canonical(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> SchemaCheck:
    """A checked validator per schema, built once: checking a schema costs milliseconds."""
    schema = json.loads(schema_json)
    jsonschema.Draft202012Validator.check_schema(schema)
    return SchemaCheck(schema)


def _default_model() -> str:
    model = os.environ.get("THROTTLE_LLM_MODEL")
    if not model:
        raise LLMError("no model: pass model=... or set THROTTLE_LLM_MODEL in the worker's "
                       "environment")
    return model
