"""`throttle exporter`: Prometheus metrics read from Redis at scrape time.

Workers flush their counters to Redis (throttle/monitor/metrics.py), so one exporter serves the
totals of every worker process on every host; gauges (window use, pool use, cooldowns,
queue depths) are read live. See docs/observability.md for every metric.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
from prometheus_client import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from throttle import reload as config_reload
from throttle.errors import ThrottleError
from throttle.limit import format_ms
from throttle.monitor.queues import QueueDepths
from throttle.monitor.snapshot import Snapshot, read_snapshot
from throttle.monitor.sources import Sources, resolve_sources, source_options
from throttle.monitor.stats import OUTCOMES
from throttle.monitor.waiting import OTHER, REASONS, reason_label
from throttle.store import STORE_ERRORS, StoreClient

DEFAULT_PORT = 9808


class ThrottleCollector(Collector):
    """Yields every throttle metric from one snapshot of Redis (and the broker) per scrape."""

    def __init__(self, sources: Sources, queues: QueueDepths | None) -> None:
        self.sources = sources
        self.queues = queues
        self.client: StoreClient | None = None  # made at the first scrape that reaches Redis

    def reload(self) -> None:
        """Load the tools file again (on SIGHUP); a ConfigError keeps the running config."""
        self.sources = dataclasses.replace(self.sources,
                                           config=config_reload.reload_file(self.sources.config))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("throttle_exporter_redis_up",
                               "1 if the last scrape could read the gate's Redis.")
        try:
            if self.client is None:
                self.client = self.sources.redis()
            snapshot = read_snapshot(self.client, self.sources.config, self.sources.prefix,
                                     self.queues)
        except STORE_ERRORS:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from counters(snapshot)
        yield from gauges(snapshot)


def counters(snapshot: Snapshot) -> Iterator[Metric]:
    """The counters workers flushed: decisions, delays, body durations, store errors."""
    decisions = CounterMetricFamily("throttle_decisions_total", "Gate decisions by tool, "
                                    "outcome and reason (a call delayed twice makes two).",
                                    labels=["tool", "outcome", "reason"])
    delayed = CounterMetricFamily("throttle_delayed_calls_total", "Calls delayed at least once, "
                                  "by the reason of their first delay.", labels=["tool", "reason"])
    exceeded = CounterMetricFamily("function_rate_limit_exceeded_total",
                                   "Calls that fell back (their slot would miss the deadline, "
                                   "or the store failed).", labels=["tool", "tool_name"])
    delays = HistogramMetricFamily("throttle_delay_seconds", "Waits given to delayed calls.",
                                   labels=["tool"])
    durations = HistogramMetricFamily("function_call_duration_seconds",
                                      "Durations of tool bodies by status.",
                                      labels=["tool", "tool_name", "status"])
    store_errors = 0
    for view in snapshot.tools:
        name, totals = view.tool.name, view.totals
        for outcome in OUTCOMES:
            for reason, count in by_label(outcome, totals.decisions.get(outcome, {})).items():
                decisions.add_metric([name, outcome, reason], count)
        for reason, count in by_label("delay", totals.delayed_calls).items():
            delayed.add_metric([name, reason], count)
        exceeded.add_metric([name, name], totals.outcome("fallback"))
        if totals.delay is not None:
            delays.add_metric([name], totals.delay.cumulative(), totals.delay.total)
        for status, histogram in totals.runs.items():
            durations.add_metric([name, name, status], histogram.cumulative(), histogram.total)
        store_errors += totals.store_errors
    yield decisions
    yield delayed
    yield exceeded
    yield delays
    yield durations
    yield CounterMetricFamily("throttle_store_errors_total", "Failures of the gate's store seen by "
                              "workers.", value=store_errors)


def by_label(outcome: str, counts: Mapping[str, int]) -> dict[str, int]:
    """Counts per reason label: every known reason of `outcome` (0 if none), the rest as "other"."""
    labelled = dict.fromkeys((*REASONS[outcome], OTHER), 0)
    for reason, count in counts.items():
        labelled[reason_label(outcome, reason)] += count
    return labelled


def gauges(snapshot: Snapshot) -> Iterator[Metric]:
    """What Redis and the broker hold now: window use, queues, cooldowns, pool use."""
    in_window = GaugeMetricFamily("tool_requests_in_window",
                                  "Calls admitted in the tool's shortest window, now.",
                                  labels=["tool", "tool_name"])
    limit_rate = GaugeMetricFamily("throttle_limit_per_second",
                                   "The tool's tightest limit as a rate (max / window).",
                                   labels=["tool"])
    effective = GaugeMetricFamily("throttle_effective_limit_per_second",
                                  "The tool's tightest limit as a rate, lowered by its class's "
                                  "allowance (share x max) in its pool.", labels=["tool"])
    waiting = GaugeMetricFamily("throttle_waiting_calls", "Calls held in workers with an ETA "
                                "(delayed, not yet run), by the reason of their last delay.",
                                labels=["tool", "reason"])
    reserved = GaugeMetricFamily("throttle_reserved_slots",
                                 "Reserved slots not yet used.", labels=["tool"])
    depth = GaugeMetricFamily("throttle_queue_depth", "Calls in the tool's broker queue (not yet "
                              "taken by a worker).",
                              labels=["tool"])
    cooldown = GaugeMetricFamily("throttle_cooldown_seconds",
                                 "Seconds left in the tool's (or its pool's) cooldown.",
                                 labels=["tool"])
    for view in snapshot.tools:
        name = view.tool.name
        rate = min(limit.max * 1000 / limit.window_ms for limit in view.limits)
        limit_rate.add_metric([name], rate)
        effective.add_metric([name], snapshot.effective_rate(view))
        for reason, count in by_label("delay", view.waiting).items():
            waiting.add_metric([name, reason], count)
        if view.shortest is not None:
            in_window.add_metric([name, name], view.shortest.used)
        if view.reserved is not None:
            reserved.add_metric([name], view.reserved)
        if view.queue_depth is not None:
            depth.add_metric([name], view.queue_depth)
        if view.cooldown_s is not None:
            cooldown.add_metric([name], view.cooldown_s)
    pool_usage = GaugeMetricFamily("throttle_pool_usage",
                                   "The pool's use over each class's allowance (share x max) "
                                   "in its tightest window; a class admits while <= 1.",
                                   labels=["pool", "class"])
    pool_units = GaugeMetricFamily("throttle_pool_units_in_window",
                                   "Units admitted in the pool's window, now.",
                                   labels=["pool", "window"])
    for pool in snapshot.pools.values():
        for priority in pool.pool.shares:
            pool_usage.add_metric([pool.pool.name, priority], pool.class_use(priority))
        for use in pool.windows:
            pool_units.add_metric([pool.pool.name, format_ms(use.limit.window_ms)], use.used)
    yield from _quota_gauges("throttle_quota", "tool", "the tool's daily quota",
                             [(view.tool.name, view.quotas) for view in snapshot.tools],
                             snapshot.at_s)
    yield from _quota_gauges("throttle_pool_quota", "pool",
                             "the pool's daily quota (all its tools)",
                             [(pool.pool.name, pool.quotas) for pool in snapshot.pools.values()],
                             snapshot.at_s)
    live = GaugeMetricFamily("throttle_live_limit_set_at_seconds",
                             "When each live override (`throttle limits set`) was set, with "
                             "what it applies to, its limits and who set it.",
                             labels=["target", "limits", "set_by", "version"])
    for override in snapshot.overrides:
        live.add_metric([override.target, override.limits_text, override.set_by,
                         str(override.version)], override.set_at_s)
    adaptive = GaugeMetricFamily("throttle_adaptive_limit",
                                 "An adaptive pool's or tool's limit of its longest window: "
                                 "configured (or overridden) and effective (learned from the "
                                 "upstream's answers).", labels=["target", "window", "kind"])
    moved = GaugeMetricFamily("throttle_adaptive_moved_at_seconds",
                              "When an adaptive limit last moved, and why ('headers: ...', "
                              "'429', 'raised').", labels=["target", "reason"])
    for state in snapshot.adaptive:
        window = format_ms(state.window_ms)
        adaptive.add_metric([state.target, window, "configured"], state.configured)
        adaptive.add_metric([state.target, window, "effective"], state.effective)
        if state.changed_at_s is not None:
            moved.add_metric([state.target, state.reason], state.changed_at_s)
    tenant_admitted = GaugeMetricFamily(
        "throttle_tenant_admitted_last_minute", "Calls of a fair tool admitted in the last "
        "minute, for its top tenants and 'other'", labels=["tool", "tenant"])
    tenant_wait = GaugeMetricFamily(
        "throttle_tenant_wait_seconds_mean", "Mean wait from enqueue to admission in the last "
        "minute, for a fair tool's top tenants and 'other'", labels=["tool", "tenant"])
    for view in snapshot.tools:
        for tenant in view.tenants:
            tenant_admitted.add_metric([view.tool.name, tenant.tenant], tenant.admitted)
            tenant_wait.add_metric([view.tool.name, tenant.tenant], tenant.mean_wait_s)
    yield from (tenant_admitted, tenant_wait)
    yield from (in_window, limit_rate, effective, waiting, reserved, depth, cooldown,
                pool_usage, pool_units, live, adaptive, moved)


def _stop(signum: int, _: Any) -> None:
    sys.exit(0)


@click.command(short_help="Serve throttle's metrics to Prometheus.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 inside a container).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@source_options
def exporter(host: str, port: int, redis_url: str, broker_url: str | None, prefix: str,
             config_path: Path | None) -> None:
    """Serve /metrics: the counters every worker flushed to Redis, and live gauges."""
    try:
        sources = resolve_sources(redis_url, broker_url, prefix, config_path)
    except ThrottleError as exc:
        raise click.ClickException(str(exc)) from None
    registry = CollectorRegistry()
    collector = ThrottleCollector(sources, sources.queues())
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    signal.signal(signal.SIGTERM, _stop)
    config_reload.install(collector.reload, "exporter")
    click.echo(f"throttle exporter on http://{host}:{server.server_port}/metrics "
               f"({sources.describe()})", err=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        collector.close()


def _quota_gauges(metric: str, label: str, what: str, owners: list[tuple[str, Any]],
                  at_s: float) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """`<metric>_remaining` and `<metric>_reset_seconds` of each owner's daily quotas."""
    left = GaugeMetricFamily(f"{metric}_remaining", f"Units left today in {what}.",
                             labels=[label, "quota"])
    reset = GaugeMetricFamily(f"{metric}_reset_seconds", f"Seconds until {what} resets.",
                              labels=[label, "quota"])
    for name, quotas in owners:
        for quota in quotas:
            left.add_metric([name, f"{quota.max}/1d"], quota.remaining)
            reset.add_metric([name, f"{quota.max}/1d"], max(0.0, quota.resets_at_s - at_s))
    return left, reset
