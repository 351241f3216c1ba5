"""The gateway's metrics: each request counted under its own tool and status."""

from __future__ import annotations

from throttle.gateway.metrics import GatewayMetrics


def test_repeated_observations_count_under_their_own_tool_and_status() -> None:
    metrics = GatewayMetrics(lambda: 0)
    for tool, status in [("chat", 200), ("chat", 200), ("chat", 429), (None, 400), ("chat", 200)]:
        metrics.observe(tool, status, 0.01, "deadline" if status == 429 else None)
    text = metrics.exposition().decode()
    assert 'throttle_gateway_requests_total{status="200",tool="chat"} 3.0' in text
    assert 'throttle_gateway_requests_total{status="429",tool="chat"} 1.0' in text
    assert 'throttle_gateway_requests_total{status="400",tool="none"} 1.0' in text
    assert 'throttle_gateway_request_duration_seconds_count{tool="chat"} 4.0' in text
    assert 'throttle_gateway_fallbacks_total{reason="deadline",tool="chat"} 1.0' in text
