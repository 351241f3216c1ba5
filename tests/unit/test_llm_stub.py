"""The stub upstream's behaviour: schema-valid arguments, usage, 429s and failures on demand."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from throttle.stub.behaviour import Stub, StubSettings, completion
from throttle.stub.values import minimal_value
from throttle.tokens import prompt_tokens, text_tokens

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object"},
    {"type": "object", "required": ["a"], "properties": {"a": {"type": "string", "minLength": 3}}},
    {"type": "object", "required": ["unit"], "properties": {"unit": {"enum": ["c", "f"]}}},
    {"type": "object", "required": ["n", "x"], "properties": {
        "n": {"type": "integer", "minimum": 5, "maximum": 9},
        "x": {"type": "number", "exclusiveMinimum": 0}}},
    {"type": "object", "required": ["k"], "properties": {"k": {"type": "integer",
                                                                "exclusiveMinimum": 3}}},
    {"type": "object", "required": ["tags"], "properties": {"tags": {
        "type": "array", "minItems": 2, "items": {"type": "string", "minLength": 1}}}},
    {"type": "object", "required": ["when", "mail"], "properties": {
        "when": {"type": "string", "format": "date"},
        "mail": {"type": "string", "format": "email"}}},
    {"type": "object", "required": ["v"], "properties": {"v": {"type": ["null", "string"]}}},
    {"type": "object", "required": ["o"], "properties": {"o": {"anyOf": [
        {"type": "integer", "minimum": 1}, {"type": "string"}]}}},
    {"type": "object", "required": ["p"], "$defs": {"pt": {"type": "object", "required": ["x"],
     "properties": {"x": {"type": "integer"}}}}, "properties": {"p": {"$ref": "#/$defs/pt"}}},
    {"type": "object", "required": ["code"], "properties": {"code": {
        "type": "string", "pattern": "^[A-Z]{3}$", "examples": ["EUR"]}}},
    {"type": "object", "required": ["c"], "properties": {"c": {"const": "fixed"}}},
    {"type": "object", "allOf": [{"required": ["a"], "properties": {"a": {"type": "boolean"}}},
                                 {"required": ["b"], "properties": {"b": {"type": "integer",
                                                                          "maximum": -3}}}]},
    {"type": "object", "required": ["q"], "properties": {"q": {"type": "integer",
                                                                "minimum": 7, "multipleOf": 5}}},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_the_made_up_arguments_are_valid_against_the_schema(schema: dict[str, Any]) -> None:
    value = minimal_value(schema)
    errors = [error.message for error in Draft202012Validator(schema).iter_errors(value)]
    assert errors == [], value


def request(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hello " * 20}],
            "tools": [{"type": "function", "function": {"name": "t", "parameters": schema}}],
            "tool_choice": {"type": "function", "function": {"name": "t"}}, **extra}


def test_the_answer_is_a_forced_call_with_usage_counted_like_the_estimate() -> None:
    body = request(SCHEMAS[1], max_tokens=50)
    status, _, answer = completion(body, StubSettings(), 7)
    assert status == 200
    call = answer["choices"][0]["message"]["tool_calls"][0]
    arguments = call["function"]["arguments"]
    assert call["function"]["name"] == "t" and json.loads(arguments) == {"a": "xxx"}
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens(body["messages"], body["tools"]),
        "completion_tokens": text_tokens(arguments),
        "total_tokens": prompt_tokens(body["messages"], body["tools"]) + text_tokens(arguments),
    }


def test_an_answer_longer_than_max_tokens_is_cut_and_says_length() -> None:
    schema = {"type": "object", "required": ["a"],
              "properties": {"a": {"type": "string", "minLength": 200}}}
    _, _, answer = completion(request(schema, max_tokens=10), StubSettings(), 1)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize(("mode", "check"), [
    ("text", lambda m: "tool_calls" not in m and m["content"]),
    ("bad_json", lambda m: m["tool_calls"][0]["function"]["arguments"] == '{"unfinished": '),
    ("invalid", lambda m: m["tool_calls"][0]["function"]["arguments"] == "{}"),
])
def test_misbehaving_answers_come_on_demand(mode: str, check: Any) -> None:
    _, _, answer = completion(request(SCHEMAS[1]), StubSettings(answer=mode), 1)  # type: ignore[arg-type]
    assert check(answer["choices"][0]["message"])


def test_bad_requests_get_a_400_that_says_what_is_expected() -> None:
    assert completion({"messages": []}, StubSettings(), 1)[0] == 400
    status, _, body = completion(request(SCHEMAS[0], tool_choice={
        "type": "function", "function": {"name": "nope"}}), StubSettings(), 1)
    assert status == 400 and "'nope'" in body["error"]["message"]


def test_429s_and_failures_come_every_nth_next_n_or_in_a_window() -> None:
    stub = Stub(StubSettings(busy_every=3, retry_after_s=2))
    statuses = [(stub.refusal(None, 0.0) or (200,))[0] for _ in range(6)]
    assert statuses == [200, 200, 429, 200, 200, 429]
    stub = Stub(StubSettings(busy_next=2, fail_next=1, fail_status=502))
    statuses = [(stub.refusal(None, 0.0) or (200,))[0] for _ in range(4)]
    assert statuses == [429, 429, 502, 200]
    stub.settings = stub.settings.changed({"fail_for_s": 5}, now_s=100.0)
    assert [(stub.refusal(None, now) or (200,))[0] for now in (101.0, 104.9, 105.0)] == [
        502, 502, 200]
    refusal = Stub(StubSettings(busy_next=1, retry_after_s=3)).refusal(None, 0.0)
    assert refusal is not None and refusal[1] == {"Retry-After": "3"}


def test_a_wrong_key_gets_a_401_that_echoes_it_as_some_upstreams_do() -> None:
    stub = Stub(StubSettings(api_key="right"))
    refusal = stub.refusal("Bearer wrong", 0.0)
    assert refusal is not None and refusal[0] == 401
    assert "wrong" in refusal[2]["error"]["message"]
    assert stub.refusal("Bearer right", 0.0) is None
    assert (stub.stats.requests, stub.stats.authorized) == (2, 1)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="busy_evry"):
        StubSettings().changed({"busy_evry": 2}, now_s=0.0)
