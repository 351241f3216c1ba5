"""The tables `throttle status` and `throttle top` print: per tool, and capacity advice.

A terminal of `WIDE_MIN_COLUMNS` or more gets one column per figure; a narrower one (80
columns) gets short headers, the fullest window only, and a key under the table.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from throttle.limit import format_ms
from throttle.monitor.snapshot import Snapshot, ToolView, WindowUse
from throttle.monitor.stats import RECENT_BUCKET_S, RECENT_BUCKETS

DASH = "—"
WIDE_MIN_COLUMNS = 150
NARROW_KEY = (
    "window: the fullest window's use · rsv: reserved slots · queue: calls in the broker "
    "queue · wait: calls held in workers with an ETA · adm / dly / fb: calls admitted, "
    "delayed (delay decisions, when more) and fallen back in the last minute · cool: "
    "cooldown left · pool: the class's use of its allowance in the pool"
)
POOL_NOTE = ("class use over 100% is not over-admission: the pool never exceeds its limit, "
             "but classes with a larger share have filled it past this class's allowance, "
             "which then admits nothing until it falls under 100%")
CAPACITY_NOTE = ("slots = min(arriving, limit) x mean body time (Little's law): the worker "
                 "slots (processes x concurrency) busy at once to run every call the limit "
                 "admits; for a tool whose calls cost other than 1 unit (limit/s in units), "
                 "arriving x body time")


def _percent_style(fraction: float) -> str:
    return "red" if fraction >= 1 else "yellow" if fraction >= 0.8 else ""


def _number(value: float | None) -> str:
    return DASH if value is None else f"{value:g}"


def _use(use: WindowUse, short: bool) -> Text:
    text = Text(f"{use.used:g}/{use.limit.max}", style=_percent_style(use.fraction))
    return text.append(f" {'' if short else 'per '}{format_ms(use.limit.window_ms)}")


def _windows(view: ToolView, short: bool) -> Text:
    if view.windows is None:
        return Text("per key", style="dim")
    if short:
        return _use(max(view.windows, key=lambda use: use.fraction), short)
    return Text(", ").join(_use(use, short) for use in view.windows)


def _delayed(view: ToolView) -> str:
    """Calls delayed in the last minute, and the delay decisions when a call was delayed again."""
    calls, decisions = int(view.last_minute.get("delayed_calls", 0)), \
        int(view.last_minute.get("delay", 0))
    return f"{calls} ({decisions})" if decisions != calls else str(calls)


def _pool(snapshot: Snapshot, view: ToolView, short: bool) -> Text:
    use = snapshot.pool_use(view)
    if use is None:
        return Text(DASH)
    label = "" if short else f"{view.tool.pool}/{view.tool.priority} "
    return Text(f"{label}{use:.0%}", style=_percent_style(use))


def tools_table(snapshot: Snapshot, title: str, width: int) -> RenderableType:
    """One row per tool: wide with every figure, or narrow (short headers and a key)."""
    short = width < WIDE_MIN_COLUMNS
    cooling = any(view.cooldown_s for view in snapshot.tools)
    if short:
        names = ["tool", "window", "rsv", "queue", "wait", "adm", "dly", "fb",
                 *(["cool"] if cooling else []), "pool"]
        table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE,
                      pad_edge=False, caption=NARROW_KEY, caption_justify="left")
    else:
        names = ["tool", "limits", "in window now", "reserved", "queued", "waiting", "admitted",
                 "delayed", "fallback", "cooldown", "pool/class use"]
        table = Table(title=title, title_justify="left", header_style="bold",
                      caption="admitted / delayed (delay decisions, when more) / fallback: "
                      "calls in the last minute; waiting: calls held in workers with an ETA",
                      caption_justify="left")
    for name in names:
        text = name in ("tool", "limits", "in window now", "window", "pool/class use", "pool")
        table.add_column(name, justify="left" if text else "right",
                         no_wrap=name != "tool", overflow="ellipsis" if name == "tool" else "fold",
                         min_width=None if name == "tool" else len(name))
    for view in snapshot.tools:
        recent, cooldown = view.last_minute, view.cooldown_s
        fallback = int(recent.get("fallback", 0))
        cells: list[str | Text] = [view.tool.name]
        if not short:
            cells.append(", ".join(str(limit) for limit in view.limits)
                         + (" (live)" if view.live else ""))
        cells += [
            _windows(view, short), _number(view.reserved), _number(view.queue_depth),
            str(view.waiting_calls), str(int(recent.get("admit", 0))), _delayed(view),
            Text(str(fallback), style="red" if fallback else ""),
        ]
        if not short or cooling:
            cells.append(DASH if not cooldown else f"{cooldown:.1f}s")
        cells.append(_pool(snapshot, view, short))
        table.add_row(*cells)
    return table


def _rate(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def capacity_table(snapshot: Snapshot) -> Table:
    """Per tool, from the last minute: arrival and admission rates, the effective limit, the
    mean body time, and the worker slots that rate needs (Little's law)."""
    span_s = (RECENT_BUCKETS - 1) * RECENT_BUCKET_S + snapshot.at_s % RECENT_BUCKET_S
    table = Table(title="capacity, last minute", title_justify="left", header_style="bold",
                  box=box.SIMPLE, pad_edge=False, caption=CAPACITY_NOTE, caption_justify="left")
    for name in ("tool", "arriving/s", "admitted/s", "limit/s", "body ms", "slots needed"):
        table.add_column(name, justify="left" if name == "tool" else "right",
                         no_wrap=name != "tool", overflow="ellipsis" if name == "tool" else "fold",
                         min_width=None if name == "tool" else len(name))
    for view in snapshot.tools:
        recent = view.last_minute
        arriving, admitted = recent.get("arrived", 0) / span_s, recent.get("admit", 0) / span_s
        limit = snapshot.effective_rate(view)
        bodies = recent.get("body:count", 0)
        body_s = recent.get("body:sum", 0) / bodies if bodies else None
        calls_per_s = min(arriving, limit) if view.tool.cost == 1 else arriving
        slots = None if body_s is None else calls_per_s * body_s
        table.add_row(view.tool.name, _rate(arriving), _rate(admitted), _rate(limit),
                      DASH if body_s is None else f"{body_s * 1000:.3g}",
                      DASH if slots is None else f"{slots:.1f}")
    return table


def pool_lines(snapshot: Snapshot) -> list[Text]:
    """A line per pool: its windows, each class's use of its allowance, its cooldown."""
    lines = []
    for pool in snapshot.pools.values():
        uses = ", ".join(f"{use.used:g}/{use.limit.max} per {format_ms(use.limit.window_ms)}"
                         for use in pool.windows)
        classes = ", ".join(f"{name} {pool.class_use(name):.0%} (share {share:g})"
                            for name, share in pool.pool.shares.items())
        cooling = f"; cooldown {pool.cooldown_s:.1f}s" if pool.cooldown_s else ""
        lines.append(Text(f"pool {pool.pool.name}: {uses}; class use {classes}{cooling}"))
    if any(pool.class_use(name) > 1 for pool in snapshot.pools.values()
           for name in pool.pool.shares):
        lines.append(Text(POOL_NOTE, style="dim"))
    return lines


def quota_lines(snapshot: Snapshot) -> list[Text]:
    """A line per daily quota: units left today and when it resets."""
    lines = []
    for view in snapshot.tools:
        for use in view.quotas:
            left_s = max(0, int(use.resets_at_s - snapshot.at_s))
            lines.append(Text(
                f"quota {view.tool.name}: {use.remaining:g} of {use.max} left today, resets in "
                f"{left_s // 3600}h{left_s % 3600 // 60:02d}m (midnight {view.tool.quota_tz})",
                style="red" if use.remaining <= 0 else ""))
    for pool in snapshot.pools.values():
        for use in pool.quotas:
            left_s = max(0, int(use.resets_at_s - snapshot.at_s))
            lines.append(Text(
                f"quota pool {pool.pool.name}: {use.remaining:g} of {use.max} left today, "
                f"resets in {left_s // 3600}h{left_s % 3600 // 60:02d}m (midnight "
                f"{pool.pool.quota_tz})", style="red" if use.remaining <= 0 else ""))
    return lines


def override_lines(snapshot: Snapshot) -> list[Text]:
    """A line per live override (`throttle limits set`): its limits, who set it and when."""
    return [
        Text(f"live limits {o.target}: {o.limits_text}, set by {o.set_by} at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(o.set_at_s))} "
             f"(version {o.version}; `throttle limits reset` goes back to the file)",
             style="cyan")
        for o in snapshot.overrides
    ]


def adaptive_lines(snapshot: Snapshot) -> list[Text]:
    """A line per adaptive pool or tool: configured vs effective limit, and why it moved."""
    lines = []
    for state in snapshot.adaptive:
        window = format_ms(state.window_ms)
        why = ""
        if state.reason and state.changed_at_s is not None:
            at = time.strftime("%H:%M:%S", time.localtime(state.changed_at_s))
            why = f" (last moved {at}: {state.reason})"
        style = "yellow" if state.effective < state.configured else "cyan"
        lines.append(Text(f"adaptive {state.target}: effective {state.effective:g}/{window} of "
                          f"configured {state.configured:g}/{window}{why}", style=style))
    return lines


def limit_warnings(snapshot: Snapshot, config_source: str) -> list[str]:
    """A line per tool whose workers enforce other limits than the config read here says."""
    lines = []
    for view in snapshot.tools:
        configured = ", ".join(str(limit) for limit in view.tool.limits)
        if view.enforced_limits is not None and view.enforced_limits != configured:
            lines.append(
                f"{view.tool.name}: its workers enforce {view.enforced_limits}, but "
                f"{config_source} says {configured}, so its windows here are wrong; pass the "
                "workers' tools file (--config or THROTTLE_CONFIG)"
            )
    return lines


def tenant_lines(snapshot: Snapshot) -> list[Text]:
    """Per fair tool: calls parked now, and the top tenants of the last minute."""
    lines = []
    for view in snapshot.tools:
        if view.fair_by is None:
            continue
        top = ", ".join(f"{use.tenant} {use.admitted} (wait {use.mean_wait_s:.2f} s)"
                        for use in view.tenants) or "none admitted"
        lines.append(Text(f"{view.tool.name}: shared fairly by {view.fair_by!r}; parked "
                          f"{view.waiting.get('parked', 0)}; admitted in the last minute, "
                          f"by tenant (mean wait): {top}"))
    return lines


def render(snapshot: Snapshot, title: str, width: int, warnings: list[str] | None = None) -> Group:
    """Everything `status` prints: warnings, the tools table, pools, and capacity advice."""
    parts: list[RenderableType] = [Text(f"warning: {line}", style="yellow")
                                   for line in warnings or []]
    parts.append(tools_table(snapshot, title, width))
    parts += pool_lines(snapshot)
    parts += quota_lines(snapshot)
    parts += tenant_lines(snapshot)
    parts += override_lines(snapshot)
    parts += adaptive_lines(snapshot)
    parts.append(capacity_table(snapshot))
    return Group(*parts)
