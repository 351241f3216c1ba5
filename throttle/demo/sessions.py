"""The demo's runaway agent: how long the other sessions waited beside it (`--runaway`).

Run the demo with `--runaway N` (one session loops on N extra searches), then again
with `--fair-by session_id` as well: the line printed after the summary, and the summary's
`sessions` entry, compare the other sessions' waits and fallbacks with the runaway's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from throttle.demo.report import percentile
from throttle.demo.tracker import Call


@dataclass(frozen=True, slots=True)
class SessionWaits:
    """Waits (send to admission) of some sessions' calls, and how many fell back."""

    calls: int
    p50_s: float | None
    p95_s: float | None
    max_s: float | None
    fallbacks: int


def waits_of(calls: Iterable[Call]) -> SessionWaits:
    chosen = list(calls)
    waits = [wait for call in chosen if (wait := call.wait_s) is not None]
    return SessionWaits(len(chosen), percentile(waits, 0.5), percentile(waits, 0.95),
                        max(waits, default=None),
                        sum(1 for call in chosen if call.outcome == "fallback"))


def session_waits(calls: Iterable[Call], runaway: str) -> dict[str, Any]:
    """The runaway session's waits and the other sessions', for the summary."""
    chosen = list(calls)
    return {"runaway_session": runaway,
            "runaway": asdict(waits_of(c for c in chosen if c.session == runaway)),
            "others": asdict(waits_of(c for c in chosen if c.session != runaway))}


def session_line(waits: dict[str, Any], fair_by: str | None) -> str:
    """One line: the other sessions' waits beside the runaway, and how limits were shared."""
    others, runaway = waits["others"], waits["runaway"]

    def seconds(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f} s"

    shared = f"shared fairly by {fair_by}" if fair_by else "first come, first served"
    return (f"runaway {waits['runaway_session']} ({runaway['calls']} calls, "
            f"{runaway['fallbacks']} fell back) · the other sessions' waits: p50 "
            f"{seconds(others['p50_s'])}, p95 {seconds(others['p95_s'])}, max "
            f"{seconds(others['max_s'])}, {others['fallbacks']} of {others['calls']} fell "
            f"back ({shared})")
