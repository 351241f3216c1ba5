"""The seed's scenario and tool bodies, which live in the deployable app (`workers/`).

The demo drives them by name: the library imports nothing of `workers` statically, and
importing the bodies or the scenario does not build the deployed app (workers/celery.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast

from throttle.functions import load_function

SCENARIO = "workers.scenario"
BODIES = {
    "search_products": "workers.tools.catalog:search_products",
    "get_inventory": "workers.tools.catalog:get_inventory",
    "lookup_order": "workers.tools.catalog:lookup_order",
    "process_refund": "workers.tools.catalog:process_refund",
    "chat_completion": "workers.tools.llm:chat_completion",
}

_scenario = importlib.import_module(SCENARIO)
DEMO_TOOLS: tuple[str, ...] = _scenario.DEMO_TOOLS
LLM_TOOL: str = _scenario.LLM_TOOL


class PlannedCall(Protocol):
    """One tool call of one session, `at_s` seconds after the demo starts."""

    at_s: float
    session_id: str
    tool: str
    kwargs: Mapping[str, Any]


RUNAWAY_SESSION: str = _scenario.RUNAWAY_SESSION


def plan_sessions(
    sessions: int, duration_s: float, tools: Iterable[str], *, seed: int = 7, runaway: int = 0
) -> list[PlannedCall]:
    """Every call of the run, in firing order (`workers.scenario.plan_sessions`); `runaway`
    extra searches fired at once by RUNAWAY_SESSION."""
    return cast(list[PlannedCall], _scenario.plan_sessions(sessions, duration_s, tools,
                                                           seed=seed, runaway=runaway))


def body(tool: str) -> Callable[..., Any]:
    """The plain function that serves `tool` in the deployed app."""
    return load_function(BODIES[tool])
