"""The demo's summary: per-tool counts, the busiest window against its limit, waits, a chart.

"Most admitted in any window" is measured on the admission times the gate logged (Redis
clock), grouped per key value for tools limited per key; it must never exceed the limit.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from throttle.config import Config, ToolConfig
from throttle.demo.tracker import Call, Tracker

CHART_NAME = "throttle-demo.png"
SUMMARY_NAME = "summary.json"
_EPSILON_S = 1e-7  # scores carry microseconds; two entries a window apart share no window


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit and the most units admitted in any window of it."""

    limit: str
    max: int
    window_ms: int
    most_admitted: int


@dataclass(frozen=True, slots=True)
class ToolSummary:
    """What happened to one tool's calls."""

    tool: str
    calls: int
    admitted: int
    delayed: int
    fallbacks: int
    unanswered: int
    limits: tuple[LimitCheck, ...]
    delay_p50_s: float | None
    delay_p95_s: float | None


def most_in_window(times: Sequence[float], window_s: float) -> int:
    """The most times found in any half-open interval (t - window_s, t]."""
    ordered = sorted(times)
    best = start = 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - window_s + _EPSILON_S:
            start += 1
        best = max(best, end - start + 1)
    return best


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` in 0..1), or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summarize(tracker: Tracker, config: Config) -> list[ToolSummary]:
    """One summary per tool the demo called."""
    summaries = []
    for tool in config.tools.values():
        calls = tracker.calls_of(tool.name)
        if calls:
            summaries.append(_summarize_tool(tool, calls))
    return summaries


def _summarize_tool(tool: ToolConfig, calls: list[Call]) -> ToolSummary:
    by_key: dict[Any, list[float]] = defaultdict(list)
    for call in calls:
        if call.admitted_at is not None:
            by_key[str(call.key_value)].append(call.admitted_at)
    checks = tuple(
        LimitCheck(
            str(limit), limit.max, limit.window_ms,
            max((most_in_window(times, limit.window_ms / 1000) for times in by_key.values()),
                default=0),
        )
        for limit in tool.limits
    )
    delays = [wait for call in calls if (wait := call.wait_s) is not None]
    return ToolSummary(
        tool=tool.name,
        calls=len(calls),
        admitted=sum(call.outcome == "result" for call in calls),
        delayed=sum(call.delayed for call in calls),
        fallbacks=sum(call.outcome == "fallback" for call in calls),
        unanswered=sum(call.outcome is None for call in calls),
        limits=checks,
        delay_p50_s=percentile(delays, 0.50),
        delay_p95_s=percentile(delays, 0.95),
    )


def summary_table(summaries: Sequence[ToolSummary], *, keyed: set[str]) -> Table:
    """The end-of-run table; the busiest window is green when within its limit."""
    table = Table(
        title="Summary", title_justify="left", header_style="bold", caption_justify="left",
        caption="delay = from sending to admission by the gate, over the admitted calls; "
        "windows are measured on the gate's admission log",
    )
    for name in ("tool", "calls", "admitted", "delayed", "fallbacks"):
        table.add_column(name, justify="left" if name == "tool" else "right")
    table.add_column("most admitted in any window", justify="right")
    table.add_column("delay p50", justify="right")
    table.add_column("delay p95", justify="right")
    for item in summaries:
        busiest = Text()
        for index, check in enumerate(item.limits):
            ok = check.most_admitted <= check.max
            busiest.append(" · " if index else "")
            busiest.append(f"{check.most_admitted} / {check.max} in {check.limit.split('/')[1]}",
                           style="green" if ok else "bold red")
        if item.tool in keyed:
            busiest.append(" (busiest key)", style="dim")
        fallbacks = str(item.fallbacks) + (f" (+{item.unanswered} unanswered)"
                                           if item.unanswered else "")
        table.add_row(
            item.tool, str(item.calls), str(item.admitted), str(item.delayed), fallbacks,
            busiest, _seconds(item.delay_p50_s), _seconds(item.delay_p95_s),
        )
    return table


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def write_summary(path: Path, summaries: Sequence[ToolSummary], **run: Any) -> None:
    """The summary as JSON, with the run's settings (`run`)."""
    document = {**run, "tools": {item.tool: asdict(item) for item in summaries}}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
