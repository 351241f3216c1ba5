"""The gateway's own Prometheus metrics (GET /metrics), in a registry of its own.

  throttle_gateway_requests_total{tool,status}          answered requests, by HTTP status
  throttle_gateway_request_duration_seconds{tool}       from the request to its answer
  throttle_gateway_fallbacks_total{tool,reason}         429s carrying the tool's fallback
  throttle_gateway_calls_waiting                        calls published and not yet answered

`tool` is the throttle tool that gated the request ("none" when it was refused before one
was chosen: bad JSON, a missing key, an unknown route). The gate's own decisions are the
exporter's (`throttle exporter`, docs/observability.md).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NO_TOOL = "none"


class GatewayMetrics:
    """Counters and a histogram for one gateway process."""

    def __init__(self, waiting: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "throttle_gateway_requests", "Requests answered, by tool and HTTP status.",
            ["tool", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "throttle_gateway_request_duration_seconds",
            "Seconds from a request's arrival to its answer, by tool.",
            ["tool"], buckets=BUCKETS_S, registry=self.registry,
        )
        self.fallbacks = Counter(
            "throttle_gateway_fallbacks", "Requests answered 429 with the tool's fallback.",
            ["tool", "reason"], registry=self.registry,
        )
        gauge = Gauge("throttle_gateway_calls_waiting",
                      "Calls published and awaiting their result.", registry=self.registry)
        gauge.set_function(lambda: float(waiting()))

        # (tool, status) -> its request counter and latency histogram: a labels() lookup
        # costs about 3 us; tools come from the config and statuses are few, so it stays small
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def observe(self, tool: str | None, status: int, seconds: float,
                fallback_reason: str | None = None) -> None:
        label = tool or NO_TOOL
        children = self._children.get((label, status))
        if children is None:
            children = self._children[label, status] = (
                self.requests.labels(tool=label, status=str(status)),
                self.latency.labels(tool=label))
        requests, latency = children
        requests.inc()
        latency.observe(seconds)
        if fallback_reason:
            self.fallbacks.labels(tool=label, reason=fallback_reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
