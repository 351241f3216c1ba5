"""Reading the model's answer: the forced tool call, JSON arguments valid for its schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from throttle import load_config
from workers.tools.llm import ModelAnswerError, forced_tool, read_answer
from workers.tools.llm_http import LLMError

CONFIG = Path(__file__).resolve().parents[2] / "config" / "tools.toml"
SCHEMA = {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
          "properties": {"city": {"type": "string", "minLength": 1},
                         "unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time"}}]
USAGE = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}


def answer(arguments: Any, *, name: str = "get_weather", finish: str = "tool_calls",
           usage: Any = USAGE) -> dict[str, Any]:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": raw}}
    return {"model": "m-1", "usage": usage, "choices": [
        {"index": 0, "finish_reason": finish,
         "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}


def test_a_valid_call_becomes_a_result_valid_against_the_tool_s_result_schema() -> None:
    result = read_answer(answer({"city": "Paris", "unit": "c"}), "get_weather", SCHEMA, 64)
    assert result == {"source": "llm", "tool": "get_weather",
                      "arguments": {"city": "Paris", "unit": "c"}, "model": "m-1",
                      "finish_reason": "tool_calls", "usage": USAGE}
    schema = load_config(CONFIG).tool("chat_completion").result
    assert list(Draft202012Validator(schema).iter_errors(result)) == []


def test_an_answer_without_the_forced_call_says_what_came_instead() -> None:
    text = {"model": "m", "usage": USAGE, "choices": [
        {"finish_reason": "stop", "message": {"role": "assistant", "content": "Hello!"}}]}
    with pytest.raises(ModelAnswerError, match=r"did not call the forced tool 'get_weather'.*"
                                               r"no tool call.*'stop'"):
        read_answer(text, "get_weather", SCHEMA, 64)
    with pytest.raises(ModelAnswerError, match=r"answered with \['get_time'\]"):
        read_answer(answer({}, name="get_time"), "get_weather", SCHEMA, 64)
    with pytest.raises(ModelAnswerError, match="no choices"):
        read_answer({"error": "?"}, "get_weather", SCHEMA, 64)
    junk = {"usage": USAGE, "choices": [{"message": {"tool_calls": ["junk", {"function": 3}]}}]}
    with pytest.raises(ModelAnswerError, match="no tool call"):
        read_answer(junk, "get_weather", SCHEMA, 64)


def test_arguments_that_are_not_json_are_an_error_and_a_cut_answer_says_so() -> None:
    with pytest.raises(ModelAnswerError, match="not valid JSON: "):
        read_answer(answer('{"city": '), "get_weather", SCHEMA, 64)
    with pytest.raises(ModelAnswerError, match=r"cut at max_tokens: raise max_tokens.*was 8"):
        read_answer(answer('{"city": "Par', finish="length"), "get_weather", SCHEMA, 8)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"city": "Paris"}, "at arguments: 'unit' is a required property"),
        ({"city": "Paris", "unit": "k"}, "at unit: 'k' is not one of"),
        ({"city": "", "unit": "c"}, "at city: '' should be non-empty"),
        (None, "at arguments: None is not of type 'object'"),
    ],
)
def test_arguments_that_break_the_schema_name_the_place(arguments: Any, expected: str) -> None:
    with pytest.raises(ModelAnswerError, match=f"break the tool's schema {expected}"):
        read_answer(answer(arguments), "get_weather", SCHEMA, 64)


def test_an_answer_without_usage_cannot_be_settled() -> None:
    with pytest.raises(ModelAnswerError, match="no usage"):
        read_answer(answer({"city": "P", "unit": "c"}, usage=None), "get_weather", SCHEMA, 64)
    with pytest.raises(ModelAnswerError, match="usage is incomplete"):
        read_answer(answer({"city": "P", "unit": "c"}, usage={"prompt_tokens": 1}),
                    "get_weather", SCHEMA, 64)


def test_the_forced_tool_is_named_plainly_or_in_openai_s_form_or_is_the_only_one() -> None:
    assert forced_tool(TOOLS, "get_time") == "get_time"
    assert forced_tool(TOOLS, {"type": "function", "function": {"name": "get_weather"}}) == (
        "get_weather")
    assert forced_tool(TOOLS[:1], None) == "get_weather"
    with pytest.raises(LLMError, match="tools holds 2 tools; name the one to force"):
        forced_tool(TOOLS, None)
    with pytest.raises(LLMError, match="'get_news' is not one of the tools"):
        forced_tool(TOOLS, "get_news")
