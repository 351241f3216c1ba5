"""The demo's summary: per-tool counts, the busiest window against its limit, waits, a chart.

"Most admitted in any window" is measured on the admission times the gate logged (Redis
clock), grouped per key value for tools limited per key; it must never exceed the limit. It
counts units: calls, or for a tool with a cost (the LLM tool's tokens) the charges as
settled, read from the tool's cost hash.

Per pool and priority class: the calls admitted, the most units of the pool in use in a
window ending at one of the class's admissions (never above the class's allowance, share x
max), and the calls delayed by the pool; and the pool's most units in any window (never
above its max). All measured on the pool's own log. Results do not say why a call waited,
so "delayed by the pool" is inferred: an admitted call counts when the part of its wait that
its tool's reservation does not explain (`Call.unexplained_waits`) overlaps a time when the
pool was at the class's allowance, so that the gate could not have admitted it then.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from throttle.config import Config, PoolConfig, ToolConfig
from throttle.demo.tracker import DELAYED_AFTER_S, Call, PoolAdmission, Tracker
from throttle.windows import most_in_window

CHART_NAME = "throttle-demo.png"
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit and the most units admitted in any window of it."""

    limit: str
    max: int
    window_ms: int
    most_admitted: float


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


@dataclass(frozen=True, slots=True)
class PoolCheck:
    """One pool limit: the units allowed (max, or share x max for a class) and the most in
    use in any window (for a class: any window ending at one of its admissions)."""

    limit: str
    window_ms: int
    allowed: float
    most_used: float


@dataclass(frozen=True, slots=True)
class ClassSummary:
    """What one priority class of a pool got."""

    priority: str
    share: float
    tools: tuple[str, ...]
    admitted: int
    delayed_by_pool: int
    limits: tuple[PoolCheck, ...]


@dataclass(frozen=True, slots=True)
class PoolSummary:
    """A pool's admissions, its busiest windows, and its classes."""

    pool: str
    admitted: int
    delayed_by_pool: int
    limits: tuple[PoolCheck, ...]
    classes: tuple[ClassSummary, ...]


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


def summarize_pools(tracker: Tracker, config: Config) -> list[PoolSummary]:
    """One summary per pool the demo's tools are in."""
    return [_summarize_pool(pool, tracker, config) for pool in tracker.used_pools()]


class PoolUse:
    """A pool's units in use over time, for one window length, from its admissions."""

    def __init__(self, admissions: Iterable[PoolAdmission], window_ms: int) -> None:
        ordered = sorted(admissions, key=lambda entry: entry.at_us)
        self.times = [entry.at_us for entry in ordered]
        self.window_us = window_ms * 1000
        self._sums = [0.0, *itertools.accumulate(entry.units for entry in ordered)]

    def at(self, at_us: int) -> float:
        """Units admitted in the window (t - window, t] ending at `at_us`."""
        last = bisect.bisect_right(self.times, at_us)
        first = bisect.bisect_right(self.times, at_us - self.window_us)
        return self._sums[last] - self._sums[first]

    def most(self) -> float:
        """The most units in any window (the busiest window ends at an admission)."""
        return max((self.at(at_us) for at_us in self.times), default=0.0)

    def most_during(self, start_us: int, end_us: int) -> float:
        """The most units in use at any time in [start, end)."""
        inside = self.times[bisect.bisect_right(self.times, start_us):
                            bisect.bisect_left(self.times, end_us)]
        return max([self.at(start_us), *(self.at(at_us) for at_us in inside)])


def _summarize_pool(pool: PoolConfig, tracker: Tracker, config: Config) -> PoolSummary:
    entries = tracker.pools.get(pool.name, {})
    uses = [PoolUse(entries.values(), limit.window_ms) for limit in pool.limits]
    classes = []
    for priority, share in pool.shares.items():
        tools = tuple(tool.name for tool in config.tools.values()
                      if tool.pool == pool.name and tool.priority == priority)
        if not tools:
            continue
        admitted = [(entries[member], call) for member, call in list(tracker.calls.items())
                    if call.tool in tools and member in entries]
        checks = tuple(
            PoolCheck(str(limit), limit.window_ms, share * limit.max,
                      max((use.at(entry.at_us) for entry, _ in admitted), default=0.0))
            for limit, use in zip(pool.limits, uses, strict=True)
        )
        delayed = sum(_held_by_pool(call, entry.units, share, pool, uses)
                      for entry, call in admitted)
        classes.append(ClassSummary(priority, share, tools, len(admitted), delayed, checks))
    return PoolSummary(
        pool=pool.name,
        admitted=len(entries),
        delayed_by_pool=sum(item.delayed_by_pool for item in classes),
        limits=tuple(
            PoolCheck(str(limit), limit.window_ms, float(limit.max), use.most())
            for limit, use in zip(pool.limits, uses, strict=True)
        ),
        classes=tuple(classes),
    )


def _held_by_pool(
    call: Call, units: float, share: float, pool: PoolConfig, uses: Sequence[PoolUse]
) -> bool:
    """Whether a wait of `call` that its tool does not explain overlaps a time when the pool
    could not take its `units` within the class's allowance."""
    for start_s, end_s in call.unexplained_waits():
        start_us, end_us = round(start_s * 1_000_000), round(end_s * 1_000_000)
        for limit, use in zip(pool.limits, uses, strict=True):
            if use.most_during(start_us, end_us) + units > share * limit.max:
                return True
    return False


def _summarize_tool(tool: ToolConfig, calls: list[Call]) -> ToolSummary:
    by_key: dict[Any, list[Call]] = defaultdict(list)
    for call in calls:
        if call.admitted_at is not None:
            by_key[str(call.key_value)].append(call)
    checks = tuple(
        LimitCheck(
            str(limit), limit.max, limit.window_ms,
            _whole(max((most_in_window([call.admitted_at or 0.0 for call in admitted],
                                       limit.window_ms / 1000, [call.units for call in admitted])
                        for admitted in by_key.values()), default=0.0)),
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
            busiest.append(f"{check.most_admitted:g} / {check.max} in "
                           f"{check.limit.split('/')[1]}",
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


def pool_table(item: PoolSummary) -> Table:
    """A pool's figures per priority class; a busiest window is green within its allowance."""
    limits = " + ".join(check.limit for check in item.limits)
    table = Table(
        title=f"Pool {item.pool} ({limits}) per priority class", title_justify="left",
        header_style="bold", caption_justify="left",
        caption="pool use when it admitted = the most units of the pool in a window ending at "
        "one of the class's admissions, against its allowance (share x max); delayed by the "
        f"pool = waited over {DELAYED_AFTER_S:g} s beyond its tool's own slot while the pool "
        "was at the class's allowance (inferred from the logs)",
    )
    for name in ("class", "share", "tools", "admitted", "pool use when it admitted",
                 "delayed by the pool"):
        table.add_column(name, justify="left" if name in ("class", "tools") else "right")
    for group in item.classes:
        table.add_row(
            group.priority, f"{group.share:g}", ", ".join(group.tools), str(group.admitted),
            _checks(group.limits), str(group.delayed_by_pool),
        )
    table.add_section()
    table.add_row(
        "all classes", "", "", str(item.admitted), _checks(item.limits),
        str(item.delayed_by_pool), style="bold",
    )
    return table


def _checks(checks: Sequence[PoolCheck]) -> Text:
    text = Text()
    for index, check in enumerate(checks):
        ok = check.most_used <= check.allowed
        text.append(" · " if index else "")
        text.append(f"{check.most_used:g} / {check.allowed:g} in {check.limit.split('/')[1]}",
                    style="green" if ok else "bold red")
    return text


def _whole(value: float) -> float:
    """`value`, as an int when it is whole (calls, and settled token counts)."""
    return int(value) if value.is_integer() else value


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def write_summary(
    path: Path, summaries: Sequence[ToolSummary], pools: Sequence[PoolSummary] = (), **run: Any
) -> None:
    """The summary as JSON, with the run's settings (`run`)."""
    document = {
        **run,
        "tools": {item.tool: asdict(item) for item in summaries},
        "pools": {item.pool: asdict(item) for item in pools},
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
