"""The chat route's own reading and answering: the ASGI messages, not Starlette's objects."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from fastapi.responses import JSONResponse
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect

from throttle.gateway.app import (
    MAX_BODY_DEPTH,
    encode_answer,
    fallback_reason,
    nesting_depth,
    read_json,
    request_headers,
)
from throttle.gateway.errors import ApiError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=4),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest, by its definition (recursive)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _receive(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


@given(JSON)
def test_an_answer_is_encoded_as_starlettes_json_response_encodes_it(body: Any) -> None:
    headers = {"X-Throttle-Tool": "chat_completion", "X-Throttle-Fallback-Reason": "deadline",
               "Retry-After": "3"}
    response = JSONResponse(body, 429, headers)
    assert encode_answer(429, body, headers) == (429, response.raw_headers, response.body)


def test_an_answer_keeps_non_ascii_text_and_refuses_numbers_json_cannot_hold() -> None:
    _, headers, body = encode_answer(200, {"city": "Besançon ✓"}, {})
    assert json.loads(body) == {"city": "Besançon ✓"} and "✓".encode() in body
    assert headers == [(b"content-length", str(len(body)).encode()),
                       (b"content-type", b"application/json")]
    assert fallback_reason(headers) is None
    with pytest.raises(ValueError):
        encode_answer(200, {"x": math.inf}, {})


@given(JSON)
def test_the_nesting_depth_is_the_recursive_definitions(value: Any) -> None:
    assert nesting_depth(value) == _depth(value)


def test_the_nesting_depth_of_any_depth_is_counted_without_recursion() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert nesting_depth(deep) == MAX_BODY_DEPTH + 1  # counting stops one level past the limit
    exact: Any = {}
    for _ in range(MAX_BODY_DEPTH - 1):
        exact = {"a": [1, "b"], "c": exact}
    assert nesting_depth(exact) == MAX_BODY_DEPTH


def test_the_request_headers_read_are_the_first_of_each_name() -> None:
    scope = {"headers": [(b"host", b"x"), (b"authorization", b"Bearer a"),
                         (b"authorization", b"Bearer b"), (b"x-throttle-max-delay", b"5")]}
    assert request_headers(scope) == {b"authorization": "Bearer a",
                                      b"x-throttle-max-delay": "5"}


def test_a_body_in_several_messages_is_read_whole_and_a_disconnect_is_not_a_body() -> None:
    payload = json.dumps({"messages": [{"role": "user", "content": "hé"}]}).encode()
    parts = [payload[:7], payload[7:20], payload[20:]]
    messages = [{"type": "http.request", "body": part, "more_body": i < 2}
                for i, part in enumerate(parts)]
    assert asyncio.run(read_json(_receive(*messages), None, 1024)) == json.loads(payload)
    one = asyncio.run(read_json(_receive({"type": "http.request", "body": payload}), None, 1024))
    assert one == json.loads(payload)
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_json(_receive({"type": "http.request", "body": b"{", "more_body": True},
                                       {"type": "http.disconnect"}), None, 1024))


@pytest.mark.parametrize(("messages", "declared", "status", "code"), [
    ([{"type": "http.request", "body": b"x" * 600, "more_body": True},
      {"type": "http.request", "body": b"x" * 600}], None, 413, "request_too_large"),
    ([], "2000", 413, "request_too_large"),
    ([{"type": "http.request", "body": b""}], None, 400, "invalid_json"),
    ([{"type": "http.request", "body": b'{"a": NaN}'}], None, 400, "invalid_json"),
    ([{"type": "http.request", "body": b'{"a": 1e999}'}], None, 400, "invalid_json"),
    ([{"type": "http.request", "body": b"[" * 65 + b"]" * 65}], None, 400, "too_deep"),
])
def test_bodies_the_route_refuses(messages: list[dict[str, Any]], declared: str | None,
                                  status: int, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_json(_receive(*messages), declared, 1024))
    assert (refused.value.status, refused.value.code) == (status, code)


def test_bodies_in_utf16_or_with_a_bom_are_read_as_json_loads_reads_them() -> None:
    text = json.dumps({"content": "hé ✓"})
    for raw in (text.encode("utf-16"), text.encode("utf-8-sig"), text.encode("utf-32-le")):
        got = asyncio.run(read_json(_receive({"type": "http.request", "body": raw}), None, 1024))
        assert got == json.loads(raw)
