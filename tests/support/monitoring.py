"""Helpers for the monitoring tests: a ledger tool, `throttle exporter` as a server, scraping."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import free_port, server, throttle_cmd, write_config

PARAMS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}
RESULT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def ledger_tool(limits: list[str], max_delay: str, **extra: Any) -> dict[str, Any]:
    """A tool of tests/apps/ledger.py: takes `n`, returns {"n": n}, falls back to {"n": -1}."""
    return {"limits": limits, "max_delay": max_delay, "params": PARAMS, "result": RESULT,
            "fallback": {"n": -1}, **extra}


@contextmanager
def exporter(tmp_path: Path, config: dict[str, Any], *, redis_url: str, broker_url: str,
             prefix: str) -> Iterator[str]:
    """Run `throttle exporter` on a free loopback port for `config`; yields its /metrics URL."""
    path = write_config(config, tmp_path / "exporter-tools.toml")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    cmd = throttle_cmd("exporter", "--port", str(port), "--redis-url", redis_url,
                       "--broker-url", broker_url, "--prefix", prefix, "--config", str(path))
    with server(cmd, tmp_path / "exporter.log", url):
        yield url


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of every sample of `name` whose labels include `labels` (None if there is none)."""
    found = [v for (sample, have), v in samples.items()
             if sample == name and set(labels.items()) <= set(have)]
    return sum(found) if found else None


# A pool shared by a batch tool limited to 10/1m and a critical tool whose calls cost 2.5.
POOLED: dict[str, Any] = {
    "pools": {"shared": {"limits": ["40/60s"], "shares": {"critical": 1.0, "batch": 0.5}}},
    "tools": {
        "light": ledger_tool(["10/60s"], "90s", pool="shared", priority="batch"),
        "heavy": ledger_tool(["100/60s"], "90s", pool="shared", priority="critical", cost=2.5),
    },
}


def seed_pooled_state(redis_url: str, prefix: str, broker_url: str, backend_url: str) -> None:
    """Put POOLED in a known state: light 10 admitted + 2 reserved, heavy 2 admitted (5
    units), pool 15/40, a 30 s cooldown on the pool, and 3 calls of light in its queue."""
    from tests.apps.ledger import build
    from throttle import Gate, load_config

    gate = Gate(redis_url, load_config(POOLED), prefix=prefix)
    try:
        actions = [gate.acquire("light", f"light-{i}").action.value for i in range(12)]
        actions += [gate.acquire("heavy", f"heavy-{i}", cost=2.5).action.value for i in range(2)]
        assert actions == ["admit"] * 10 + ["delay"] * 2 + ["admit"] * 2, actions
        gate.cool_down("heavy", 30)
    finally:
        gate.close()
    env = {"THROTTLE_REDIS_URL": redis_url, "THROTTLE_PREFIX": prefix,
           "THROTTLE_BROKER_URL": broker_url, "THROTTLE_RESULT_BACKEND": backend_url,
           "THROTTLE_TEST_CONFIG": json.dumps(POOLED)}
    app, _, tasks = build(env)
    for n in range(3):
        tasks["light"].delay(n=n)
    app.close()
