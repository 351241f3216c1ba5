"""Arguments nested too deep are refused by `.delay()` (at any depth, never with a raw
RecursionError), and `message_problem` names what is wrong with a hand-made message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery

from throttle import InvalidToolCall, Throttle, load_config
from throttle.intake import MAX_ARGS_DEPTH, message_problem, nested_deeper_than

TOOLS: dict[str, Any] = {"tools": {"chat": {"limits": ["5/1s"], "max_delay": "30s"}}}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def chat_task() -> Any:
    app = Celery("intake", broker="memory://", set_as_current=False)
    throttle = Throttle(app, load_config(TOOLS))

    def chat(**_: Any) -> dict[str, Any]:
        return {}

    return throttle.tool(chat)


def test_depth_is_measured_without_recursion_at_any_depth() -> None:
    assert not nested_deeper_than(nested(MAX_ARGS_DEPTH), MAX_ARGS_DEPTH)
    assert nested_deeper_than(nested(MAX_ARGS_DEPTH + 1), MAX_ARGS_DEPTH)
    assert nested_deeper_than({"a": [{"b": nested(100_000)}]}, MAX_ARGS_DEPTH)
    loop: list[Any] = []
    loop.append(loop)
    assert nested_deeper_than(loop, MAX_ARGS_DEPTH)  # a cycle ends at the limit
    assert not nested_deeper_than("just text", 0)


@pytest.mark.parametrize("depth", [MAX_ARGS_DEPTH, 500, 3_000, 100_000])
def test_delay_refuses_arguments_nested_too_deep_with_invalid_tool_call(depth: int) -> None:
    task = chat_task()
    messages = [{"role": "user", "content": nested(depth)}]
    with pytest.raises(InvalidToolCall, match=f"more than {MAX_ARGS_DEPTH} levels deep"):
        task.delay(messages=messages)
    with pytest.raises(InvalidToolCall, match="levels deep"):  # re-publish headers skip nothing
        task.apply_async(kwargs={"messages": messages},
                         headers={"throttle_enqueued_at": 1.0})


def problem(body: Any, **headers: Any) -> str | None:
    raw = json.dumps(body)
    return message_problem({"id": "t1", "task": "tool.chat", **headers}, raw,
                           lambda: json.loads(raw), 65_536, 3600.0)


def test_a_well_formed_message_has_no_problem() -> None:
    assert problem([[], {"q": "x"}, {"callbacks": None}]) is None


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        ([[], nested(40), None], {}, "keyword arguments must be an object"),
        ([[], {"q": nested(40)}, None], {}, "levels deep"),
        ([[], {"q": nested(90)}, None], {}, "levels deep"),
        ([[1], {}, None], {}, "pass arguments by keyword"),
        ({"hello": "world"}, {}, "not Celery's"),
        ([[], {}, None], {"id": 7}, "task id must be a string"),
        ([[], {}, None], {"id": ""}, "task id must be a string"),
        ([[], {}, None], {"retries": "3"}, "'retries' must be a whole number"),
        ([[], {}, None], {"timelimit": [float("nan"), None]}, "'timelimit'"),
        ([[], {}, None], {"eta": 5}, "header 'eta' must be a string"),
        ([[], {"q": "x" * 200_000}, None], {}, "far above the tool's max_args_bytes"),
        ([[], {"q": "x" * 65_530}, None], {}, "above the tool's max_args_bytes (65536)"),
        ([[], {}, None], {"eta": "2999-01-01T00:00:00+00:00"}, "not below the broker's visib"),
        ([[], {}, None], {"eta": "soon"}, "header 'eta' is not an ISO 8601 time"),
        ([[], {}, None], {"stamped_headers": "x"}, "'stamped_headers' must be a list"),
    ],
)
def test_a_malformed_message_is_named(body: Any, headers: dict[str, Any], expected: str) -> None:
    found = problem(body, **headers)
    assert found is not None and expected in found


def test_a_body_that_cannot_be_decoded_is_a_problem_not_an_exception() -> None:
    def decode() -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    found = message_problem({"id": "t1"}, b"[[[", decode, 65_536)
    assert found is not None and "could not be decoded (RecursionError" in found


def test_a_countdown_or_eta_past_the_visibility_timeout_is_refused_by_apply_async() -> None:
    task = chat_task()
    with pytest.raises(InvalidToolCall, match="not below the broker's visibility timeout"):
        task.apply_async(kwargs={}, countdown=10 * 86_400)
    with pytest.raises(InvalidToolCall, match="eta/countdown unreadable"):
        task.apply_async(kwargs={}, countdown="soon")
    task.apply_async(kwargs={}, countdown=5)  # within it: fine


@pytest.mark.parametrize("task_id", [7, "", "x" * 300])
def test_a_task_id_that_is_not_a_short_string_is_refused(task_id: Any) -> None:
    with pytest.raises(InvalidToolCall, match="task_id must be a string"):
        chat_task().apply_async(kwargs={}, task_id=task_id)


@pytest.mark.parametrize(
    "raw_kwargs",
    [
        '{"q":"' + "\U0001f600" * 40 + '"}',  # each character two \u escapes (12 chars)
        '{"q":"' + "é" * 60 + '"}',  # each character one \u escape (6 chars)
        '{"q":[' + ",".join(["9e15"] * 20) + "]}",  # each number 18 characters
    ],
)
@pytest.mark.parametrize("as_text", [True, False])
def test_arguments_that_grow_when_encoded_again_are_measured_as_the_caller_measures_them(
    raw_kwargs: str, as_text: bool,
) -> None:
    body_text = f'[[],{raw_kwargs},null]'
    body: str | bytes = body_text if as_text else body_text.encode()
    kwargs = json.loads(raw_kwargs)
    encoded = len(json.dumps(kwargs, separators=(",", ":")))
    assert encoded > len(body)  # the body alone would under-count them
    for limit in (encoded - 1, encoded):
        found = message_problem({"id": "t1"}, body, lambda: json.loads(body_text), limit)
        if limit < encoded:
            assert found is not None and f"arguments are {encoded} bytes" in found
        else:
            assert found is None
