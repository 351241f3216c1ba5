"""The gate's answer to one call: `Action` and `Decision`, typed from the script's reply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    """What the worker does with a call."""

    ADMIT = "admit"
    DELAY = "delay"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer: the action, how long to wait, the slot (epoch seconds) and why."""

    action: Action
    wait_s: float
    slot_at: float
    reason: str


_ACTIONS: dict[str | bytes, Action] = {
    **{a.value: a for a in Action},
    **{a.value.encode(): a for a in Action},
}


def text(value: Any) -> str:
    """One item of a script's reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decision_of(raw: Sequence[Any]) -> Decision:
    """The Decision in acquire.lua's reply {action, wait_ms, slot_ms, reason}."""
    action, wait_ms, slot_ms, reason = raw
    return Decision(_ACTIONS[action], float(wait_ms) / 1000, float(slot_ms) / 1000, text(reason))
