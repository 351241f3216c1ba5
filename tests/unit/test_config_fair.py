"""`fair_by`, `fair_weights` and `fair_horizon` in the tools file: what loads, what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from throttle import load_config
from throttle.errors import ConfigError
from throttle.fairness import fairness_of

PARAMS = {"type": "object", "properties": {"tenant": {"type": "string"}},
          "required": ["tenant"]}


def tool(**extra: Any) -> dict[str, Any]:
    return {"limits": ["20/1s"], "max_delay": "30s", "params": PARAMS, **extra}


def test_a_fair_tool_loads_with_its_weights_and_a_default_horizon_of_half_its_window() -> None:
    config = load_config({"tools": {"t": tool(fair_by="tenant", fair_weights={"acme": 3})}})
    fair = fairness_of(config, config.tool("t"))
    assert fair is not None
    assert (fair.by, fair.horizon_ms, fair.pool) == ("tenant", 500, None)
    assert (fair.weight("acme"), fair.weight("globex")) == (3, 1)


def test_a_pool_with_fair_by_shares_one_queue_among_its_tools() -> None:
    config = load_config({
        "pools": {"p": {"limits": ["100/1m"], "shares": {"a": 1.0}, "fair_by": "tenant",
                        "fair_horizon": "2s"}},
        "tools": {"x": tool(pool="p", priority="a"), "y": tool(pool="p", priority="a")},
    })
    for name in ("x", "y"):
        fair = fairness_of(config, config.tool(name))
        assert fair is not None and (fair.pool, fair.horizon_ms) == ("p", 2000)


@pytest.mark.parametrize(("extra", "expected"), [
    ({"fair_by": "user"}, "field 'fair_by': 'user' is not a parameter of the tool"),
    ({"fair_by": "tenant", "params": {"type": "object", "properties": {
        "tenant": {"type": "string"}}}},
     "'tenant' is optional, so a call without it would escape the fair share by tenant"),
    ({"fair_by": "tenant", "fair_weights": {"acme": 0}},
     "field 'fair_weights': the weight of 'acme' must be a positive, finite number"),
    ({"fair_by": "tenant", "fair_horizon": 5}, "field 'fair_horizon': 5 needs a unit"),
    ({"fair_by": "tenant", "fair_horizon": "1000h"},
     "field 'fair_horizon': '1000h' is longer than the most allowed"),
])
def test_a_bad_fair_field_is_refused_naming_the_tool_and_field(
    extra: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"tools": {"t": tool(**extra)}})
    assert "tool 't'" in str(caught.value)
    assert expected in str(caught.value)


def test_a_pool_sharing_by_an_argument_its_tool_lacks_is_refused() -> None:
    with pytest.raises(ConfigError, match="tool 'x', field 'params' \\(pool 'p' has fair_by = "
                       "'tenant'\\): 'tenant' is not a parameter"):
        load_config({
            "pools": {"p": {"limits": ["100/1m"], "shares": {"a": 1.0}, "fair_by": "tenant"}},
            "tools": {"x": {"limits": ["20/1s"], "max_delay": "30s", "pool": "p",
                            "priority": "a", "params": {"type": "object", "properties": {
                                "n": {"type": "integer"}}}}},
        })


def test_fair_by_on_both_a_pool_and_its_tool_is_refused() -> None:
    with pytest.raises(ConfigError, match="set fair_by on the pool or on its tools, not both"):
        load_config({
            "pools": {"p": {"limits": ["100/1m"], "shares": {"a": 1.0}, "fair_by": "tenant"}},
            "tools": {"x": tool(pool="p", priority="a", fair_by="tenant")},
        })
