"""The fast schema check gives jsonschema's verdicts and errors, never a laxer one."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from throttle import schema_check
from throttle.schema_check import SchemaCheck

pytest.importorskip("jsonschema_rs")

CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "tools.toml"
with CONFIG_PATH.open("rb") as handle:
    TOOLS: dict[str, Any] = tomllib.load(handle)["tools"]
CHAT = {
    "messages": [{"role": "user", "content": "Weather in Lyon?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather",
                                                "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "model": "stub-1",
    "max_tokens": 32,
}


def verdicts(schema: Any, instance: Any, *, parsed: bool = True) -> tuple[Any, Any]:
    """The fast check's error message and jsonschema's own (None when valid)."""
    fast = SchemaCheck(schema).first_error(instance, parsed=parsed)
    slow = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(instance))
    return (fast and (fast.message, list(fast.absolute_path)),
            slow and (slow.message, list(slow.absolute_path)))


def test_the_shipped_tools_schemas_are_checked_fast() -> None:
    assert all(SchemaCheck(tool["params"]).fast is not None for tool in TOOLS.values())


@pytest.mark.parametrize(("schema", "instance"), [
    # jsonschema-rs alone would accept each of these, which jsonschema refuses
    ({"type": "string", "pattern": r"^\s*$"}, "\ufeff"),  # ECMA's \s holds U+FEFF
    ({"multipleOf": 0.01}, 0.07),  # jsonschema's float division
    ({"properties": {"name": {"pattern": r"^\S+$"}}}, {"name": "a\x1cb"}),
])
def test_what_jsonschema_refuses_stays_refused_with_its_error(schema: Any,
                                                              instance: Any) -> None:
    fast, slow = verdicts(schema, instance)
    assert slow is not None and fast == slow


@pytest.mark.parametrize(("schema", "instance"), [
    ({"type": "string", "pattern": "^a$"}, "a\n"),  # Python's $ matches before a last \n
    ({"type": "string", "pattern": r"^\d+$"}, "\u0661\u0662"),  # Unicode digits
    ({"type": "string", "minLength": 1}, "\ud800"),  # a lone surrogate, as json.loads gives
])
def test_what_jsonschema_accepts_stays_accepted(schema: Any, instance: Any) -> None:
    assert verdicts(schema, instance) == (None, None)


def test_a_tuple_from_python_code_is_judged_by_jsonschema_alone() -> None:
    schema = TOOLS["chat_completion"]["params"]
    call = {**CHAT, "messages": tuple(CHAT["messages"])}
    fast, slow = verdicts(schema, call, parsed=False)
    assert slow is not None and fast == slow
    assert "is not of type 'array'" in slow[0]


@pytest.mark.parametrize("schema", [
    {"patternProperties": {"^x-": {"type": "string"}}},
    {"properties": {"a": {}}, "unevaluatedProperties": False},
    {"$ref": "http://127.0.0.1:9/schema.json"},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"},
    {"items": [{"type": "string"}]},
    {"x-vendor": {"type": "string"}},
])
def test_schemas_with_other_keywords_are_left_to_jsonschema(schema: Any) -> None:
    assert SchemaCheck(schema).fast is None


def test_without_jsonschema_rs_jsonschema_checks_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema_check, "jsonschema_rs", None)
    check = SchemaCheck(TOOLS["chat_completion"]["params"])
    assert check.fast is None and check.first_error(CHAT, parsed=True) is None
    error = check.first_error({**CHAT, "max_tokens": 0}, parsed=True)
    assert error is not None and list(error.absolute_path) == ["max_tokens"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)


@st.composite
def near_valid_chat_calls(draw: st.DrawFn) -> Any:
    """The valid call above with one part replaced by any JSON value."""
    call = json.loads(json.dumps(CHAT))
    where = draw(st.sampled_from([
        ("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
        ("tools", 0, "function", "name"), ("tools", 0, "type"), ("tool_choice",),
        ("tool_choice", "function", "name"), ("model",), ("max_tokens",), ("temperature",),
        ("session_id",), ("extra",),
    ]))
    value = draw(JSON | st.sampled_from(["user", "tool", "function", "get_weather", "", 0,
                                         1, 2.5, 100001, "a" * 65, "a\n"]))
    target = call
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = value
    return call


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=near_valid_chat_calls())
def test_the_chat_tool_gets_jsonschema_verdicts_and_errors(call: Any) -> None:
    fast, slow = verdicts(TOOLS["chat_completion"]["params"], call)
    assert fast == slow
