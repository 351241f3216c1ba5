"""`throttle demo`: pick the stack, fire the scenario, show it live, then sum it up."""

from __future__ import annotations

import os
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.live import Live

from throttle.config import Config
from throttle.config_file import load_config
from throttle.demo.chart import write_chart
from throttle.demo.configs import demo_tools_only, scale_config, share_fairly
from throttle.demo.embedded import embedded_stack
from throttle.demo.live import banner, live_view
from throttle.demo.real import DemoError, real_stack
from throttle.demo.report import (
    CHART_NAME,
    SUMMARY_NAME,
    pool_table,
    summarize,
    summarize_pools,
    summary_table,
    write_summary,
)
from throttle.demo.seed import DEMO_TOOLS, LLM_TOOL, RUNAWAY_SESSION, PlannedCall, plan_sessions
from throttle.demo.sessions import session_line, session_waits
from throttle.demo.stack import Stack
from throttle.demo.tracker import Tracker
from throttle.demo.upstream import stub_upstream

REFRESH_S = 0.25
GRACE_S = 15.0
KEPT_CONFIG_NAME = "tools.toml"  # `--keep`: the scaled config, next to the chart
DEMO_BROKER_DB = 1


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """The `throttle demo` options."""

    config_path: Path
    sessions: int = 50
    duration_s: float = 60.0
    time_scale: float = 10.0
    out_dir: Path = Path("demo-output")
    broker_url: str | None = None
    seed: int = 7
    llm: bool = True
    keep: bool = False  # real mode: default prefix, keys and scaled config kept
    runaway: int = 0  # extra searches one session fires over its session (a runaway agent)
    fair_by: str | None = None  # share each tool's limits fairly by this argument


def run_demo(settings: DemoSettings, console: Console) -> None:
    """Run the scenario on the embedded default, or on Redis when THROTTLE_REDIS_URL is set.

    With `settings.llm` and a config declaring `chat_completion`, the sessions ask the model
    too, and the LLM tool calls a stub upstream started for the run.
    """
    original = load_config(settings.config_path)
    raw = tomllib.loads(settings.config_path.read_text(encoding="utf-8"))
    document = scale_config(demo_tools_only(raw, llm=settings.llm), settings.time_scale)
    if settings.fair_by:
        document = share_fairly(document, settings.fair_by)
    scaled = load_config(document)
    if not set(DEMO_TOOLS) & set(scaled.tools):
        raise DemoError(f"the demo calls {', '.join(DEMO_TOOLS)}; {settings.config_path} "
                        "declares none of them")
    plan = plan_sessions(settings.sessions, settings.duration_s, scaled.tools, seed=settings.seed,
                         runaway=settings.runaway)
    with ExitStack() as exits:
        with console.status("starting the broker, workers and gate store…"):
            if LLM_TOOL in scaled.tools:
                exits.enter_context(stub_upstream())
            stack = exits.enter_context(_stack(settings, document, scaled))
        console.print(banner(stack, original, scaled, plan, settings.sessions,
                             settings.duration_s, settings.time_scale))
        tracker = Tracker(stack.app, scaled, stack.store, stack.prefix)
        try:
            started_at, elapsed_s = _run(plan, stack, tracker, scaled, console)
        finally:
            exits.callback(stack.forget_results, list(tracker.calls))
        summaries = summarize(tracker, scaled)
        pools = summarize_pools(tracker, scaled)
        chart = settings.out_dir / CHART_NAME
        scale = f", time {settings.time_scale:g}x faster" if settings.time_scale != 1 else ""
        title = f"throttle demo ({stack.mode}): {settings.sessions} sessions{scale}"
        write_chart(chart, tracker, scaled, started_at, title)
    keyed = {tool.name for tool in scaled.tools.values() if tool.key}
    console.print(summary_table(summaries, keyed=keyed))
    for pool in pools:
        console.print(pool_table(pool))
    waits = session_waits(tracker.calls.values(), RUNAWAY_SESSION) if settings.runaway else None
    if waits:
        console.print(session_line(waits, settings.fair_by))
    summary = settings.out_dir / SUMMARY_NAME
    write_summary(
        summary, summaries, pools, mode=stack.mode, sessions=settings.sessions,
        duration_s=settings.duration_s, time_scale=settings.time_scale,
        elapsed_s=round(elapsed_s, 2), prefix=stack.prefix, chart=str(chart),
        runaway=settings.runaway, fair_by=settings.fair_by, session_waits=waits,
    )
    console.print(f"elapsed {elapsed_s:.1f} s · chart: {chart} · summary: {summary}")


def _stack(settings: DemoSettings, document: dict[str, Any], scaled: Config) -> (
    AbstractContextManager[Stack]
):
    redis_url = os.environ.get("THROTTLE_REDIS_URL")
    if not redis_url:
        if settings.keep:
            raise DemoError("--keep needs THROTTLE_REDIS_URL: the embedded run's store lives "
                            "in this process and ends with it")
        return embedded_stack(scaled)
    broker_url = settings.broker_url or urlunsplit(
        urlsplit(redis_url)._replace(path=f"/{DEMO_BROKER_DB}")
    )
    kept = settings.out_dir / KEPT_CONFIG_NAME if settings.keep else None
    return real_stack(document, redis_url, broker_url, keep_config=kept)


def _run(
    plan: Sequence[PlannedCall], stack: Stack, tracker: Tracker, config: Config, console: Console
) -> tuple[float, float]:
    """Fire the plan from a thread and refresh the live table until every call is answered.

    Returns when the run started and how long it took.
    """
    longest_delay_s = max(tool.max_delay_ms for tool in config.tools.values()) / 1000
    until_s = (plan[-1].at_s if plan else 0.0) + longest_delay_s + GRACE_S
    # A log keeps an entry one window long: read the logs well within the shortest one.
    shortest_s = min(
        [tool.longest_window_ms for tool in config.tools.values()]
        + [max(limit.window_ms for limit in pool.limits) for pool in config.pools.values()]
    ) / 1000
    step_s = min(REFRESH_S, shortest_s / 4)
    views_every = max(1, round(REFRESH_S / step_s))
    stop = threading.Event()
    errors: list[BaseException] = []
    started_at = time.time()
    firing = threading.Thread(
        target=_fire, args=(plan, stack, tracker, started_at, stop, errors), daemon=True
    )
    try:
        with Live(console=console, refresh_per_second=4) as live:
            firing.start()
            for tick, elapsed_s in enumerate(_ticks(started_at, until_s, step_s)):
                tracker.poll_gate()
                if tick % views_every:
                    continue
                tracker.poll_results()
                live.update(live_view(tracker, config, plan, elapsed_s))
                if errors:
                    raise errors[0]
                if not firing.is_alive() and tracker.unanswered == 0:
                    break
            tracker.poll_gate()  # admissions logged since the last read (they stay a window)
    finally:
        stop.set()
        if firing.is_alive():
            firing.join()
        console.line()
    return started_at, time.time() - started_at


def _ticks(started_at: float, until_s: float, step_s: float) -> Iterator[float]:
    """Seconds since the start, every `step_s`, until `until_s` (then once more)."""
    while (elapsed_s := time.time() - started_at) <= until_s:
        yield elapsed_s
        time.sleep(step_s)
    yield time.time() - started_at


def _fire(
    plan: Sequence[PlannedCall], stack: Stack, tracker: Tracker, started_at: float,
    stop: threading.Event, errors: list[BaseException],
) -> None:
    """Send every planned call through `.delay()` at its time (late ones at once)."""
    try:
        for call in plan:
            wait_s = started_at + call.at_s - time.time()
            if wait_s > 0 and stop.wait(wait_s):
                return
            if stop.is_set():
                return
            sent_at = time.time()
            result = stack.tasks[call.tool].delay(**call.kwargs)
            tracker.sent(call.tool, result.id, sent_at, call.kwargs)
    except Exception as exc:
        errors.append(exc)
