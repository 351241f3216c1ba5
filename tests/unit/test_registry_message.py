"""The registry message `.delay()` writes: the arguments' JSON, already encoded to measure
their size, spliced in, gives the same text as encoding the whole message at once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from throttle import recovery

CALLS: list[dict[str, Any]] = [
    {},
    {"query": "laptops under 1000", "limit": 5},
    {"messages": [{"role": "user", "content": "h\u00e9llo \U0001f600"}], "n": None,
     "nested": {"a": [1, 2.5, True, {"b": []}]}},
]


@pytest.mark.parametrize("kwargs", CALLS)
def test_a_spliced_registry_message_is_the_message_encoded_at_once(kwargs: dict[str, Any]
                                                                    ) -> None:
    headers = {"throttle_enqueued_at": 1_700_000_000.25, "throttle_deadline_s": 30.0}
    canvas = {"root_id": "r", "link": [{"task": "x", "args": [], "kwargs": {}}]}
    whole = json.dumps({"kwargs": kwargs, "headers": headers, "check_at": 1_700_000_065.25,
                        "canvas": canvas}, separators=(",", ":"))
    spliced = recovery.message(kwargs, headers, 1_700_000_065.25, canvas,
                               kwargs_json=json.dumps(kwargs, separators=(",", ":")))
    assert spliced == whole
    assert recovery.message(kwargs, headers, 1_700_000_065.25, canvas) == whole
    assert json.loads(spliced)["kwargs"] == kwargs


def test_a_registry_message_without_a_canvas_has_an_empty_one() -> None:
    text = recovery.message({"q": 1}, {"h": 2}, 3.5, kwargs_json='{"q":1}')
    assert text == '{"kwargs":{"q":1},"headers":{"h":2},"check_at":3.5,"canvas":{}}'
