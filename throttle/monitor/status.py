"""`throttle status` and `throttle top`: every tool's limits and state, from Redis and the broker.

Per tool: its limits, how much of each window is used now, reserved slots ahead, calls
waiting in its queue, admitted / delayed / fallback in the last minute, cooldown left and
its class's use of its pool. `top` redraws the same table until Ctrl-C.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from throttle.config import format_ms
from throttle.errors import ThrottleError
from throttle.monitor.queues import QueueDepths
from throttle.monitor.snapshot import Snapshot, ToolView, read_snapshot
from throttle.monitor.sources import Sources, resolve_sources, source_options
from throttle.store import STORE_ERRORS, StoreClient

DASH = "—"
PIPED_WIDTH = 160


def _percent_style(fraction: float) -> str:
    return "red" if fraction >= 1 else "yellow" if fraction >= 0.8 else ""


def _windows(view: ToolView) -> Text:
    if view.windows is None:
        return Text("per key", style="dim")
    text = Text()
    for index, use in enumerate(view.windows):
        if index:
            text.append(", ")
        text.append(f"{use.used:g}/{use.limit.max}", style=_percent_style(use.fraction))
        text.append(f" per {format_ms(use.limit.window_ms)}")
    return text


def _number(value: float | None) -> str:
    return DASH if value is None else f"{value:g}"


def _pool(snapshot: Snapshot, view: ToolView) -> Text:
    use = snapshot.pool_use(view)
    if use is None:
        return Text(DASH)
    return Text(f"{view.tool.pool}/{view.tool.priority} {use:.0%}", style=_percent_style(use))


def render(snapshot: Snapshot, title: str) -> Group:
    """The tools table, and a line per pool."""
    table = Table(title=title, title_justify="left", header_style="bold",
                  caption="admitted / delayed / fallback: decisions in the last minute",
                  caption_justify="left")
    for name in ("tool", "limits", "in window now", "reserved", "queued", "admitted",
                 "delayed", "fallback", "cooldown", "pool/class use"):
        table.add_column(name, no_wrap=name in ("tool", "limits", "pool/class use"),
                         justify="left" if name in ("tool", "limits", "in window now",
                                                    "pool/class use") else "right")
    for view in snapshot.tools:
        recent = view.last_minute
        cooldown = view.cooldown_s
        table.add_row(
            view.tool.name,
            ", ".join(str(limit) for limit in view.tool.limits),
            _windows(view),
            _number(view.reserved),
            _number(view.queue_depth),
            str(recent.get("admit", 0)),
            str(recent.get("delay", 0)),
            Text(str(recent.get("fallback", 0)), style="red" if recent.get("fallback") else ""),
            DASH if not cooldown else f"{cooldown:.1f}s",
            _pool(snapshot, view),
        )
    lines: list[Table | Text] = [table]
    for pool in snapshot.pools.values():
        uses = ", ".join(f"{use.used:g}/{use.limit.max} per {format_ms(use.limit.window_ms)}"
                         for use in pool.windows)
        classes = ", ".join(f"{name} {pool.class_use(name):.0%} (share {share:g})"
                            for name, share in pool.pool.shares.items())
        cooling = f"; cooldown {pool.cooldown_s:.1f}s" if pool.cooldown_s else ""
        lines.append(Text(f"pool {pool.pool.name}: {uses}; class use {classes}{cooling}"))
    return Group(*lines)


def _console() -> Console:
    """A console; output to a pipe or file gets a width wide enough for the table."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def _sources(redis_url: str, broker_url: str | None, prefix: str,
             config_path: Path | None) -> Sources:
    try:
        return resolve_sources(redis_url, broker_url, prefix, config_path)
    except ThrottleError as exc:
        raise click.ClickException(str(exc)) from None


def _connect(sources: Sources) -> StoreClient:
    try:
        return sources.redis()
    except STORE_ERRORS as exc:  # a cluster client asks for the cluster's layout at once
        raise _unreadable(exc, sources) from None


def _read(client: StoreClient, sources: Sources, queues: QueueDepths) -> Snapshot:
    try:
        return read_snapshot(client, sources.config, sources.prefix, queues)
    except STORE_ERRORS as exc:
        raise _unreadable(exc, sources) from None


def _unreadable(exc: Exception, sources: Sources) -> click.ClickException:
    return click.ClickException(f"cannot read the gate's Redis ({exc}); "
                                f"reading {sources.describe()}")


def _title(snapshot: Snapshot, sources: Sources) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(snapshot.at_s))
    return f"throttle {at} — prefix {sources.prefix!r}, {sources.config.source}"


@click.command(short_help="Each tool's limits, window use, queue and recent decisions.")
@source_options
def status(redis_url: str, broker_url: str | None, prefix: str, config_path: Path | None) -> None:
    """Print each tool's limits and state now: window use, reserved slots, queue depth,
    admitted / delayed / fallback in the last minute, cooldown left and pool use."""
    sources = _sources(redis_url, broker_url, prefix, config_path)
    client, queues = _connect(sources), sources.queues()
    try:
        snapshot = _read(client, sources, queues)
        _console().print(render(snapshot, _title(snapshot, sources)))
    finally:
        client.close()
        queues.close()


@click.command(short_help="`status`, refreshed live until Ctrl-C.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes.")
@click.option("--count", default=0, type=click.IntRange(min=0),
              help="Stop after this many refreshes (default: until Ctrl-C).")
@source_options
def top(interval: float, count: int, redis_url: str, broker_url: str | None, prefix: str,
        config_path: Path | None) -> None:
    """The `status` table, refreshed every --interval seconds until Ctrl-C."""
    sources = _sources(redis_url, broker_url, prefix, config_path)
    client, queues = _connect(sources), sources.queues()
    console = _console()
    done = 0
    try:
        snapshot = _read(client, sources, queues)
        with Live(render(snapshot, _title(snapshot, sources)), console=console,
                  auto_refresh=False) as live:
            while count == 0 or done < count:
                done += 1
                if done > 1:
                    snapshot = _read(client, sources, queues)
                live.update(render(snapshot, _title(snapshot, sources)), refresh=True)
                if count == 0 or done < count:
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        queues.close()
