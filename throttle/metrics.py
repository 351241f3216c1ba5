"""What the worker observes about each call, for Prometheus (decisions by tool and outcome).

`throttle/task.py` calls these hooks; they must never raise into the task.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

DECISIONS = Counter(
    "throttle_decisions_total", "Gate decisions by tool and outcome.", ["tool", "outcome"]
)


def observe_decision(task: Any, outcome: str, reason: str, wait_s: float) -> None:
    """One gate decision for `task`'s call: admit, delay (waiting `wait_s`) or fallback."""
    DECISIONS.labels(tool=task.tool.name, outcome=outcome).inc()


def observe_run(task: Any, status: str, seconds: float) -> None:
    """A body of `task` ran for `seconds` and ended with `status` ("success" or "error")."""


def observe_store_error(task: Any) -> None:
    """The gate's store failed while deciding or finishing one of `task`'s calls."""
