"""The shortcuts a worker takes on every call decide as the long way did: the depth check
skips scalars, a delivered call's arguments meet only the schema (the intake checked the
rest), runs count under the same fields, and `collecting` nests as a context manager."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from throttle import InvalidToolCall, Throttle, adaptive, load_config
from throttle.intake import POSITIONAL, nested_deeper_than
from throttle.monitor.stats import DURATION_BUCKETS_S, _bucket, _run_fields_of

TOOLS: dict[str, Any] = {"tools": {"search": {
    "limits": ["5/1s"], "max_delay": "30s",
    "params": {"type": "object", "properties": {"query": {"type": "string"}},
               "required": ["query"]},
}}}


class Text(str):
    pass


class Mapping(dict[str, Any]):
    pass


class Items(list[Any]):
    pass


def search_task() -> Any:
    app = Celery("shortcuts", broker="memory://", set_as_current=False)
    throttle = Throttle(app, load_config(TOOLS))

    def search(**_: Any) -> dict[str, Any]:
        return {}

    return throttle.tool(search)


def test_subclassed_containers_still_count_and_subclassed_scalars_do_not() -> None:
    deep: Any = Text("x")
    for level in range(40):
        deep = Mapping(a=deep) if level % 2 else Items([deep])
    assert nested_deeper_than(deep, 32)
    assert not nested_deeper_than(Mapping(a=Text("x"), b=1, c=True, d=None, e=2.5), 1)
    assert nested_deeper_than(Mapping(a=Items([])), 1)


def test_a_delivered_call_is_refused_for_its_schema_as_the_caller_refuses_it() -> None:
    task = search_task()
    assert task._delivered_arguments((), {"query": "shoes"}) == {"query": "shoes"}
    with pytest.raises(InvalidToolCall) as delivered:
        task._delivered_arguments((), {"query": 3})
    with pytest.raises(InvalidToolCall) as called:
        task.check_arguments((), {"query": 3})
    assert str(delivered.value) == str(called.value)
    with pytest.raises(InvalidToolCall, match="pass arguments by keyword"):
        task._delivered_arguments(("shoes",), {})
    assert POSITIONAL.startswith("pass arguments by keyword")


@pytest.mark.parametrize("seconds", [0.0, 0.004, 0.005, 0.3, 59.0, 60.0, 61.0])
def test_a_run_counts_under_the_fields_its_status_and_duration_name(seconds: float) -> None:
    label = _bucket(DURATION_BUCKETS_S, seconds)
    assert _run_fields_of("success", seconds) == (
        f"run:success:le:{label}", "run:success:count", "run:success:sum")
    assert _run_fields_of("busy", seconds)[0] == f"run:busy:le:{label}"


def test_collecting_nests_and_gives_the_outer_block_its_answers_back() -> None:
    outer: list[adaptive.Answer] = []
    inner: list[adaptive.Answer] = []
    adaptive.report_headers({"x-before": "1"})  # outside any block: ignored
    with adaptive.collecting(outer) as gathered:
        assert gathered is outer
        with adaptive.collecting(inner):
            adaptive.report_headers({"x-inner": "1"}, status=429)
        adaptive.report_headers({"x-outer": "1"})
    adaptive.report_headers({"x-after": "1"})
    assert [(a.headers, a.status) for a in inner] == [({"x-inner": "1"}, 429)]
    assert [(a.headers, a.status) for a in outer] == [({"x-outer": "1"}, 200)]
