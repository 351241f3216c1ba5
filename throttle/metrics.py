"""Prometheus metrics the gate's users see (decisions by tool and outcome)."""

from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter(
    "throttle_decisions_total", "Gate decisions by tool and outcome.", ["tool", "outcome"]
)


def count_decision(tool: str, outcome: str) -> None:
    """Count one admit, delay or fallback of `tool`."""
    DECISIONS.labels(tool=tool, outcome=outcome).inc()
