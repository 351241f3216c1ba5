"""`throttle status` and `throttle top`: every tool's limits and state, from Redis and the broker.

Per tool: its limits, how much of each window is used now, reserved slots ahead, calls in
its broker queue and calls held in workers with an ETA, calls admitted / delayed / fallen
back in the last minute, cooldown left, its class's use of its pool, and capacity advice.
`top` redraws the same until Ctrl-C. The tables are in throttle/monitor/status_tables.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live

from throttle.errors import ThrottleError
from throttle.monitor.queues import QueueDepths
from throttle.monitor.snapshot import Snapshot, read_snapshot
from throttle.monitor.sources import Sources, resolve_sources, source_options
from throttle.monitor.status_tables import limit_warnings, render
from throttle.store import STORE_ERRORS, StoreClient

PIPED_WIDTH = 160


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


def _view(snapshot: Snapshot, sources: Sources, console: Console) -> Group:
    warnings = limit_warnings(snapshot, str(sources.config.source))
    return render(snapshot, _title(snapshot, sources), console.width, warnings)


@click.command(short_help="Each tool's limits, window use, queue and recent decisions.")
@source_options
def status(redis_url: str, broker_url: str | None, prefix: str, config_path: Path | None) -> None:
    """Print each tool's limits and state now: window use, reserved slots, queue depth,
    admitted / delayed / fallback in the last minute, cooldown left and pool use."""
    sources = _sources(redis_url, broker_url, prefix, config_path)
    client, queues = _connect(sources), sources.queues()
    try:
        snapshot = _read(client, sources, queues)
        console = _console()
        console.print(_view(snapshot, sources, console))
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
        with Live(_view(snapshot, sources, console), console=console,
                  auto_refresh=False) as live:
            while count == 0 or done < count:
                done += 1
                if done > 1:
                    snapshot = _read(client, sources, queues)
                live.update(_view(snapshot, sources, console), refresh=True)
                if count == 0 or done < count:
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        queues.close()
