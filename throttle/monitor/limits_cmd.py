"""`throttle limits set / reset / show`: change a tool's, a tenant's or a pool's limits live.

  throttle limits set TOOL "200/60s" ["10/1s" ...]        the tool's limits, on every worker
  throttle limits set TOOL "500/1s" "10000/1d"            ... and its daily quota
  throttle limits set TOOL --key acme "1000/60s"          a tier for one key value
  throttle limits set --pool llm "500/60s" "90000/1d"     a pool's limits (and its quota)
  throttle limits reset TOOL [--key acme] | --pool llm    back to the tools file
  throttle limits reset TOOL | --pool llm --adaptive      forget the limit learned upstream
  throttle limits show                                    every override, who set it and when
  throttle limits weight TOOL acme 3 | --reset            a tenant's share of a fair tool

Overrides live in Redis (throttle/overrides.py) and apply from the next decision on (within
0.5 s for the default of a tool whose key values have keys of their own). Each kind an
override gives (sliding limits, daily quotas) replaces the file's; a kind it leaves out stays.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from throttle.adaptive import forget
from throttle.errors import ThrottleError
from throttle.fairness import reset_live_weight, set_live_weight
from throttle.monitor.sources import Sources, resolve_sources, source_options
from throttle.overrides import (
    Override,
    parse_limits,
    read_overrides,
    reset_override,
    set_override,
)
from throttle.store import STORE_ERRORS


def _sources(redis_url: str, prefix: str, config_path: Path | None) -> Sources:
    try:
        return resolve_sources(redis_url, None, prefix, config_path)
    except ThrottleError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def _store(sources: Sources, doing: str) -> Iterator[Any]:
    """The gate's Redis client; its errors and the config's become the command's message."""
    client = sources.redis()
    try:
        yield client
    except ThrottleError as exc:
        raise click.ClickException(str(exc)) from None
    except STORE_ERRORS as exc:
        raise click.ClickException(f"cannot {doing} the gate's Redis ({exc}); "
                                   f"reading {sources.describe()}") from None
    finally:
        client.close()


def _split(target: tuple[str, ...], pool: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(tool, limit texts) from the arguments: with --pool every argument is a limit."""
    if pool is not None:
        return None, target
    if not target:
        raise click.UsageError("name a tool, e.g. `throttle limits set search 200/60s`")
    return target[0], target[1:]


_pool_option = click.option("--pool", metavar="NAME", help="Change a pool's limits instead.")
_key_option = click.option("--key", metavar="VALUE",
                           help="A tier: limits for one value of the tool's key argument.")


@click.group(short_help="Change limits, tenant tiers and pool limits live.")
def limits() -> None:
    """Change a tool's, a tenant's or a pool's limits on every worker without a restart."""


@limits.command("set")
@click.argument("args", nargs=-1, metavar="[TOOL] LIMIT...")
@_pool_option
@_key_option
@click.option("--by", "set_by", metavar="NAME", help="Who sets it (default: user@host).")
@source_options
def set_limits(args: tuple[str, ...], pool: str | None, key: str | None, set_by: str | None,
               redis_url: str, broker_url: str | None, prefix: str,
               config_path: Path | None) -> None:
    """Replace the limits of TOOL (or of one --key value, or a --pool) from now on."""
    tool, texts = _split(args, pool)
    sources = _sources(redis_url, prefix, config_path)
    with _store(sources, "write to") as client:
        override = set_override(client, sources.config, sources.prefix, parse_limits(texts),
                                tool=tool, pool=pool, key=key, set_by=set_by)
    click.echo(f"{override.target}: {override.limits_text} (version {override.version}, "
               f"set by {override.set_by})")


@limits.command("reset")
@click.argument("tool", required=False)
@_pool_option
@_key_option
@click.option("--adaptive", is_flag=True,
              help="Forget the limit learned from the upstream's answers instead.")
@source_options
def reset_limits(tool: str | None, pool: str | None, key: str | None, adaptive: bool,
                 redis_url: str, broker_url: str | None, prefix: str,
                 config_path: Path | None) -> None:
    """Go back to the tools file's limits for TOOL (or one --key value, or a --pool)."""
    if adaptive and key is not None:
        raise click.UsageError("--adaptive forgets a tool's or a pool's learned limit: "
                               "drop --key")
    sources = _sources(redis_url, prefix, config_path)
    with _store(sources, "write to") as client:
        if adaptive:
            forgot = forget(client, sources.config, sources.prefix, tool=tool, pool=pool)
            what = f"pool {pool}" if pool else f"tool {tool}"
            click.echo(f"{what}: learned limit forgotten" if forgot
                       else f"{what}: had no learned limit")
            return
        removed = reset_override(client, sources.config, sources.prefix, tool=tool, pool=pool,
                                 key=key)
    what = f"pool {pool}" if pool else f"{tool}" + (f" --key {key}" if key else "")
    click.echo(f"{what}: back to the tools file's limits" if removed
               else f"{what}: had no override")


@limits.command("weight")
@click.argument("tool")
@click.argument("tenant")
@click.argument("weight", required=False, type=click.FloatRange(0, 1e9, min_open=True))
@_key_option
@click.option("--reset", is_flag=True, help="Go back to the tools file's weight instead.")
@source_options
def weight_of(tool: str, tenant: str, weight: float | None, key: str | None, reset: bool,
              redis_url: str, broker_url: str | None, prefix: str,
              config_path: Path | None) -> None:
    """Give TENANT (a text value of TOOL's `fair_by` argument) WEIGHT shares of TOOL (of its
    pool, for a fair pool) from its next call on, on every worker; --reset goes back to
    `fair_weights` in the tools file."""
    if reset == (weight is not None):
        raise click.UsageError("give a WEIGHT, e.g. `throttle limits weight chat acme 3`, "
                               "or --reset, not both")
    sources = _sources(redis_url, prefix, config_path)
    with _store(sources, "write to") as client:
        if weight is None:
            removed = reset_live_weight(client, sources.config, tool, tenant, key=key,
                                        prefix=sources.prefix)
            click.echo(f"{tool}: tenant {tenant!r} back to the tools file's weight" if removed
                       else f"{tool}: tenant {tenant!r} had no weight set live")
            return
        set_live_weight(client, sources.config, tool, tenant, weight, key=key,
                        prefix=sources.prefix)
    click.echo(f"{tool}: tenant {tenant!r} weighs {weight:g} from its next call on")


@limits.command("show")
@source_options
def show_limits(redis_url: str, broker_url: str | None, prefix: str,
                config_path: Path | None) -> None:
    """Every live override: what it applies to, its limits, the file's, who set it and when."""
    sources = _sources(redis_url, prefix, config_path)
    with _store(sources, "read") as client:
        overrides = read_overrides(client, sources.prefix)
    if not overrides:
        click.echo("no live overrides: every tool runs on the tools file's limits")
        return
    Console(highlight=False, width=140).print(_table(overrides, sources))


def _table(overrides: list[Override], sources: Sources) -> Table:
    table = Table("applies to", "limits", "file's", "set by", "set at", "version")
    for override in overrides:
        table.add_row(override.target, override.limits_text, _file_limits(override, sources),
                      override.set_by, _when(override.set_at_s), str(override.version))
    return table


def _file_limits(override: Override, sources: Sources) -> str:
    config = sources.config
    if override.pool is not None:
        pool = config.pools.get(override.pool)
        return " ".join(str(x) for x in (*pool.limits, *pool.quotas)) if pool else (
            "(no such pool)")
    tool = config.tools.get(override.tool or "")
    return " ".join(str(x) for x in (*tool.limits, *tool.quotas)) if tool else "(no such tool)"


def _when(at_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at_s))
