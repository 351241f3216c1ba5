"""The `throttle` command: check a tools file, start a tool's worker, run the demo.

  throttle check [PATH]                  validate a tools file and list its tools
  throttle worker TOOL... [OPTIONS]      celery -A workers worker -Q tool.<TOOL>,... [OPTIONS]
  throttle demo [--sessions N] ...       the seed's burst, embedded or on THROTTLE_REDIS_URL
  throttle limits set|reset|show ...     change limits live (throttle/monitor/limits_cmd.py)
"""

from __future__ import annotations

import itertools
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from throttle.config import Config
from throttle.config_file import LOCAL_CONFIG, PROJECT_CONFIG, default_config_path, load_config
from throttle.errors import ThrottleError
from throttle.extras import require_extra
from throttle.gateway.command import gateway
from throttle.limit import format_ms
from throttle.monitor.exporter import exporter
from throttle.monitor.flower import flower
from throttle.monitor.limits_cmd import limits
from throttle.monitor.status import status, top
from throttle.stub.command import stub_llm

PIPED_WIDTH = 140
# Celery's worker pools (`celery worker -P`); the green ones need a package of their own.
POOLS = ("prefork", "threads", "gevent", "eventlet", "solo", "processes")
GREEN_POOLS = ("gevent", "eventlet")


def _console(*, stderr: bool = False) -> Console:
    """A console; output to a pipe or file gets a fixed width wide enough for the tables."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def _fail(message: str, code: int = 1) -> NoReturn:
    _console(stderr=True).print(Text(message, style="red"), soft_wrap=True)
    sys.exit(code)


def _load(path: Path, *, import_functions: bool = True) -> Config:
    try:
        return load_config(path, import_functions=import_functions)
    except ThrottleError as exc:
        _fail(str(exc))




@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distributed throttler for LLM tool calls on Celery and Redis."""


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--import", "import_functions", is_flag=True,
              help="Import the modules of `cost` / `settle` functions and check that they are "
              "callable (runs their import-time code).")
def check(path: Path | None, import_functions: bool) -> None:
    """Validate a tools file and list its tools (default: THROTTLE_CONFIG or config/tools.toml).

    Exits 1 and prints what is wrong when the file is not a valid config. A `cost` or
    `settle` function is checked by reading its module's source (it must exist and define
    the name), without importing it, unless --import is given or the source cannot tell.
    """
    path = path or Path(os.environ.get("THROTTLE_CONFIG") or LOCAL_CONFIG)
    config = _load(path, import_functions=import_functions)
    table = Table(
        title=f"{path}: {len(config.tools)} tools",
        caption=f"broker visibility_timeout {format_ms(config.visibility_timeout_ms)}",
        title_justify="left", header_style="bold",
    )
    columns = ("tool", "queue", "limits", "key", "pool / class", "concurrency", "max_delay",
               "on_store_error", "pace")
    for name in columns:
        table.add_column(name, no_wrap=name in ("tool", "queue"))
    for tool in config.tools.values():
        table.add_row(
            tool.name, tool.queue, ", ".join(
                [*(str(limit) for limit in tool.limits),
                 *(f"{quota} ({tool.quota_tz})" for quota in tool.quotas)]),
            tool.key or "—", f"{tool.pool} / {tool.priority}" if tool.pool else "—",
            str(tool.concurrency or "—"), format_ms(tool.max_delay_ms), tool.on_store_error,
            tool.pace,
        )
    _console().print(table)
    for pool in config.pools.values():
        shares = ", ".join(f"{name} {share:g}" for name, share in pool.shares.items())
        limits = ", ".join([*(str(limit) for limit in pool.limits),
                            *(f"{quota} ({pool.quota_tz})" for quota in pool.quotas)])
        _console().print(f"pool {pool.name}: {limits}; shares {shares}")


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    short_help="Run the worker of one or more tools.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="TOOL... [CELERY OPTIONS]")
def worker(args: tuple[str, ...]) -> None:
    """Run `celery -A workers worker -Q tool.<TOOL>,...`; options after the tools go to celery.

    Example: throttle worker search_products get_inventory -c 4 -l INFO

    Pick the pool for the tool's work with -P: I/O-bound calls (LLM and HTTP APIs) on
    `-P gevent -c 50` (pip install 'throttle[gevent]') or `-P threads -c 16`; CPU-bound
    bodies on prefork (the default, -c = cores). Connection pools are sized for -c.

    The tools are checked against THROTTLE_CONFIG (default: the project's config/tools.toml),
    the file the worker loads.
    """
    tools = list(itertools.takewhile(lambda arg: not arg.startswith("-"), args))
    options = list(args[len(tools):])
    _check_pool(options)
    path = Path(os.environ.get("THROTTLE_CONFIG") or PROJECT_CONFIG)
    config = _load(path)
    known = ", ".join(config.tools)
    unknown = [tool for tool in tools if tool not in config.tools]
    if not tools:
        _fail(f"name at least one tool to serve; known tools ({path}): {known}")
    if unknown:
        _fail(f"unknown tool(s) {', '.join(unknown)}; known tools ({path}): {known}")
    queues = ",".join(config.tool(tool).queue for tool in tools)
    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", queues, *options]
    _console(stderr=True).print(
        Text("exec " + shlex.join(["celery", *argv[3:]]), style="dim"), soft_wrap=True
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _pool_option(options: list[str]) -> str | None:
    """The value of celery's -P / --pool among `options`, if given (the last one wins)."""
    pool = None
    for index, option in enumerate(options):
        if option in ("-P", "--pool") and index + 1 < len(options):
            pool = options[index + 1]
        elif option.startswith("--pool="):
            pool = option.partition("=")[2]
        elif option.startswith("-P") and len(option) > 2:
            pool = option[2:]
    return pool


def _check_pool(options: list[str]) -> None:
    """Fail with the fix when -P names an unknown pool or one whose package is missing."""
    pool = _pool_option(options)
    if pool is None or ":" in pool:  # a custom pool class, "module:Class"
        return
    if pool not in POOLS:
        _fail(f"-P {pool}: unknown worker pool; choose one of {', '.join(POOLS)} "
              "(gevent or threads for I/O-bound tools, prefork for CPU-bound ones)")
    if pool in GREEN_POOLS:
        try:
            require_extra(pool, f"-P {pool}")
        except ThrottleError as exc:
            _fail(str(exc))


@main.command()
@click.option("--sessions", default=50, show_default=True, type=click.IntRange(min=1),
              help="Simulated assistant sessions.")
@click.option("--duration", "duration_s", default=60.0, show_default=True,
              type=click.FloatRange(min=3), help="Seconds the sessions run over, about the "
              "run's length (the last calls go out by five sixths; the rest drains).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Tools file (default: THROTTLE_CONFIG, else config/tools.toml).")
@click.option("--time-scale", default=10.0, show_default=True, type=click.FloatRange(min=1),
              help="Divide every window and max_delay by this, so minute limits show in seconds.")
@click.option("--out", "out_dir", default=Path("demo-output"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the chart (PNG) and the summary (JSON).")
@click.option("--broker", "broker_url", metavar="URL",
              help="Real mode only: broker and result backend for the demo's calls "
              "(default: THROTTLE_REDIS_URL with db 1).")
@click.option("--seed", default=7, show_default=True, help="Seed of the scenario's randomness.")
@click.option("--llm/--no-llm", default=True, show_default=True,
              help="Sessions also ask the model (chat_completion) through a stub upstream the "
              "demo starts; skipped when the config has no chat_completion.")
@click.option("--keep", is_flag=True,
              help="Real mode only: use the default key prefix and keep the gate's keys (and "
              "the scaled config, in --out), so `throttle status`, `top` and the exporter "
              "see the run with their default settings.")
@click.option("--runaway", default=0, show_default=True, type=click.IntRange(min=0),
              help="One session behaves like a runaway agent looping on searches: this "
              "many more, evenly over its session; the summary shows the other sessions' "
              "waits beside it.")
@click.option("--fair-by", "fair_by", metavar="ARGUMENT",
              help="Share each tool's limits fairly by this argument, e.g. session_id: run "
              "with and without it to compare the waits.")
def demo(
    sessions: int, duration_s: float, config_path: Path | None, time_scale: float,
    out_dir: Path, broker_url: str | None, seed: int, llm: bool, keep: bool, runaway: int,
    fair_by: str | None,
) -> None:
    """The seed's e-commerce burst through the throttle, shown live, then summed up.

    Without THROTTLE_REDIS_URL it runs embedded in this process (memory broker, in-process
    worker, fakeredis running the gate's Lua). With it, the gate runs on that Redis and one
    `celery -A workers worker` process serves each tool.
    """
    try:
        require_extra("demo", "throttle demo")
    except ThrottleError as exc:
        _fail(str(exc))
    from throttle.demo import DemoSettings, run_demo

    if config_path is None:
        config_path = default_config_path()
    settings = DemoSettings(
        config_path=config_path, sessions=sessions, duration_s=duration_s,
        time_scale=time_scale, out_dir=out_dir, broker_url=broker_url, seed=seed, llm=llm,
        keep=keep, runaway=runaway, fair_by=fair_by,
    )
    try:
        run_demo(settings, _console())
    except ThrottleError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        kept = "kept (--keep)" if keep else "deleted"
        _fail(f"interrupted; the demo's workers were stopped and its keys {kept}", code=130)


main.add_command(stub_llm)
main.add_command(status)
main.add_command(top)
main.add_command(exporter)
main.add_command(flower)
main.add_command(gateway)
main.add_command(limits)

if __name__ == "__main__":
    main()
