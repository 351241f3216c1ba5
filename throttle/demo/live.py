"""What the demo shows while it runs: a banner, then a table refreshed 4 times a second, a row
per tool and one per pool."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from throttle.config import Config
from throttle.demo.seed import PlannedCall
from throttle.demo.stack import Stack
from throttle.demo.tracker import DELAYED_AFTER_S, Call, Tracker
from throttle.limit import Limit

REAL_COMMAND = "THROTTLE_REDIS_URL=redis://127.0.0.1:6379/0 throttle demo"
LEGEND = (
    f"queued = sent - answered · delayed = admitted over {DELAYED_AFTER_S:g} s after sending "
    "(waited for a slot or for the pool) · reserved = holding a slot now · window use = "
    "admissions in the trailing window (gate log; a tool with a cost counts its units, the "
    "LLM's tokens) · rate = admitted in the last window ÷ window · a pool's row: its tools "
    "together, its window use from the pool's log (every tool's admissions)"
)


def banner(
    stack: Stack, original: Config, scaled: Config, plan: Sequence[PlannedCall],
    sessions: int, duration_s: float, time_scale: float,
) -> Panel:
    """Which mode runs, the scenario, and how time is scaled."""
    title = "embedded mode" if stack.mode == "embedded" else "real Redis and worker processes"
    counts = Counter(call.tool for call in plan)
    lines = [
        Text(stack.details),
        Text(f"{sessions} assistant sessions over ~{duration_s:g} s: "
             + ", ".join(f"{counts[name]} x {name}" for name in scaled.tools if counts[name])),
    ]
    pools = []
    for pool in scaled.pools.values():
        members = [tool for tool in scaled.tools.values()
                   if tool.pool == pool.name and counts[tool.name]]
        if not members:
            continue
        pools.append(pool.name)
        top = pool.limits[0].max
        classes = " · ".join(
            f"{priority} ({', '.join(tool.name for tool in members if tool.priority == priority)})"
            f" up to {share * top:g}"
            for priority, share in pool.shares.items()
            if any(tool.priority == priority for tool in members)
        )
        lines.append(Text(f"Pool {pool.name} ({_pool_limits(scaled, pool.name)}) shared by "
                          f"priority class (share x max): {classes}."))
    if time_scale != 1:
        scaled_limits = ", ".join(
            [f"{name} {_limits(original, name)} → {_limits(scaled, name)}"
             for name in scaled.tools if counts[name]]
            + [f"pool {name} {_pool_limits(original, name)} → {_pool_limits(scaled, name)}"
               for name in pools]
        )
        lines.append(Text(
            f"Time runs {time_scale:g}x faster: every window and max_delay is divided by "
            f"{time_scale:g} ({scaled_limits}).", style="yellow",
        ))
    if stack.mode == "embedded":
        lines.append(Text("This is the embedded default: nothing to install or start. On real "
                          "Redis with real worker processes:"))
        lines.append(Text(f"  {REAL_COMMAND}", style="bold cyan"))
    elif stack.kept:
        lines.append(Text(f"--keep: the gate's keys ({stack.prefix}:*) and counters stay "
                          "after the run (delete them with: redis-cli --scan --pattern "
                          f"'{stack.prefix}:*' | xargs redis-cli del).", style="dim"))
    else:
        lines.append(Text(f"The gate's keys ({stack.prefix}:*), results and queued messages "
                          "are deleted at the end.", style="dim"))
    return Panel(Group(*lines), title=f"throttle demo — {title}", title_align="left")


def _limits(config: Config, tool: str) -> str:
    return " + ".join(str(limit) for limit in config.tool(tool).limits)


def _pool_limits(config: Config, pool: str) -> str:
    return " + ".join(str(limit) for limit in config.pools[pool].limits)


def live_view(
    tracker: Tracker, config: Config, plan: Sequence[PlannedCall], elapsed_s: float
) -> RenderableType:
    """The per-tool table as it stands now, under a line on the run's progress."""
    started = {call.session_id for call in plan if call.at_s <= elapsed_s}
    sessions = {call.session_id for call in plan}
    sending_until_s = plan[-1].at_s if plan else 0.0
    phase = "sending" if elapsed_s < sending_until_s else "draining delayed calls"
    header = Text(
        f"t = {elapsed_s:5.1f} s · sessions started {len(started)}/{len(sessions)} · "
        f"{phase} (last call at {sending_until_s:.0f} s) · unanswered {tracker.unanswered}"
    )
    table = Table(header_style="bold", expand=False)
    for name in ("tool", "limit", "sent", "queued", "admitted", "delayed", "fallback",
                 "reserved", "window use", "rate /s"):
        table.add_column(name, justify="left" if name in ("tool", "limit") else "right")
    for tool in config.tools.values():
        calls = tracker.calls_of(tool.name)
        if not calls:
            continue
        view = tracker.gate.get(tool.name)
        use = view.window_use if view else tuple(0 for _ in tool.limits)
        longest_s = tool.longest_window_ms / 1000
        recent = sum(call.units for call in calls if call.admitted_at is not None
                     and tracker.now_s - longest_s < call.admitted_at <= tracker.now_s)
        table.add_row(
            tool.name,
            _limits(config, tool.name) + (" per key" if tool.key else ""),
            *_counts(calls),
            str(view.reserved if view else 0),
            _use(use, [limit.max for limit in tool.limits]),
            f"{recent / longest_s:5.1f} / {_rate(tool.limits):.1f}" + _unit(tool.cost),
        )
    for pool in tracker.used_pools():
        calls = [call for tool in config.tools.values() if tool.pool == pool.name
                 for call in tracker.calls_of(tool.name)]
        if not calls:
            continue
        units = tracker.pool_use(pool)
        longest = max(pool.limits, key=lambda limit: limit.window_ms)
        table.add_section()
        table.add_row(
            f"pool {pool.name}",
            _pool_limits(config, pool.name),
            *_counts(calls),
            "—",
            _use(units, [limit.max for limit in pool.limits]),
            f"{units[pool.limits.index(longest)] / (longest.window_ms / 1000):5.1f} / "
            f"{_rate(pool.limits):.1f}",
        )
    return Group(header, table, Text(LEGEND, style="dim"))


def _unit(cost: float | str) -> str:
    """After a rate: the unit of a tool whose calls cost a function's units (tokens)."""
    return " tok" if isinstance(cost, str) else ""


def _counts(calls: Sequence[Call]) -> list[str]:
    """Sent, queued, admitted, delayed and fallen back, as table cells."""
    answered = sum(call.outcome is not None for call in calls)
    return [
        str(len(calls)),
        str(len(calls) - answered),
        str(sum(call.outcome == "result" for call in calls)),
        str(sum(call.delayed for call in calls)),
        str(sum(call.outcome == "fallback" for call in calls)),
    ]


def _rate(limits: Sequence[Limit]) -> float:
    """The tightest of the limits, in units per second."""
    return min(limit.max / (limit.window_ms / 1000) for limit in limits)


def _use(use: Sequence[float], maxes: Sequence[int]) -> Text:
    text = Text()
    for index, (used, most) in enumerate(zip(use, maxes, strict=True)):
        text.append(" · " if index else "")
        share = used / most
        text.append(f"{used:g}/{most}", style="red" if share > 1 else "yellow" if share >= 0.9
                    else "green")
    return text
