"""The README's "Testing your tools" example, run as it is printed there (the embedded gate:
fakeredis running the gate's Lua, Celery's in-process worker and in-memory broker)."""

from __future__ import annotations

# --- README: Testing your tools ---
from typing import Any

import pytest

from throttle import Config, Throttle, fallback_reason, load_config, outcome


@pytest.fixture
def throttle_config() -> Config:
    return load_config({"tools": {"search_products": {
        "limits": ["2/1s"], "max_delay": "0.5s",
        "params": {"type": "object", "properties": {"query": {"type": "string"}}},
        "result": {"type": "object"}, "fallback": {"products": []},
    }}})


@pytest.fixture
def throttle_tools(throttle: Throttle) -> dict[str, Any]:
    @throttle.tool
    def search_products(query: str) -> dict[str, list[str]]:
        return {"products": [query]}

    return {"search_products": search_products}


def test_a_burst_gets_two_answers_then_fallbacks(
    throttle_tools: dict[str, Any], throttle_worker: Any
) -> None:
    search = throttle_tools["search_products"]
    results = [search.delay(query=f"usb hub {i}") for i in range(5)]
    answers = [result.get(timeout=10) for result in results]
    assert [outcome(result) for result in results].count("result") == 2
    assert answers.count({"products": []}) == 3
    assert {fallback_reason(r) for r in results if outcome(r) == "fallback"} == {"deadline"}
# --- end of the README example ---


pytestmark = [pytest.mark.emulation, pytest.mark.celery]
