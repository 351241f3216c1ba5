"""SIGHUP reloads the tools file of a running `throttle exporter` and `throttle gateway`: a
bad file is refused (its ConfigError logged) and the running config kept; a good one is used
from then on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.gateway import CommandServer
from tests.support.monitoring import POOLED, scrape, value
from tests.support.servers import free_port, server, throttle_cmd, write_config

pytestmark = [pytest.mark.redis]

BAD = '[tools.light]\nlimits = ["ten/60s"]\nmax_delay = "90s"\n'
PROJECT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "tools.toml"


def _wait_for(path: Path, text: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (found := path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} not in:\n{found[-3000:]}"
        time.sleep(0.05)
    return found


def test_the_exporter_reloads_its_file_on_sighup_and_keeps_it_on_a_bad_one(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    path = write_config(POOLED, tmp_path / "tools.toml")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log = tmp_path / "exporter.log"
    cmd = throttle_cmd("exporter", "--port", str(port), "--redis-url", redis_url,
                       "--prefix", prefix, "--config", str(path))
    with server(cmd, log, url) as proc:
        assert value(scrape(url), "throttle_limit_per_second", tool="light") == pytest.approx(
            10 / 60)
        path.write_text(BAD)
        os.kill(proc.pid, signal.SIGHUP)
        found = _wait_for(log, "exporter: reload refused, the running config is kept")
        assert "max 'ten' must be a whole number" in found
        assert value(scrape(url), "throttle_limit_per_second", tool="light") == pytest.approx(
            10 / 60)
        raised = {**POOLED, "tools": {**POOLED["tools"],
                                      "light": {**POOLED["tools"]["light"], "limits": ["30/60s"]}}}
        write_config(raised, path)
        os.kill(proc.pid, signal.SIGHUP)
        _wait_for(log, "exporter: tools file reloaded")
        assert value(scrape(url), "throttle_limit_per_second", tool="light") == pytest.approx(0.5)
        assert proc.poll() is None


def test_the_gateway_reloads_its_file_on_sighup_and_keeps_it_on_a_bad_one(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "tools.toml"
    path.write_bytes(PROJECT_CONFIG.read_bytes())
    gateway = CommandServer(tmp_path / "gateway.log", "gateway", "--config", str(path),
                            "--redis-url", redis_url, "--prefix", prefix)
    try:
        path.write_text(BAD)
        os.kill(gateway.proc.pid, signal.SIGHUP)
        found = _wait_for(gateway.log, "gateway: reload refused, the running config is kept")
        assert "tools added" in found or "must be a whole number" in found
        assert gateway.proc.poll() is None
        path.write_bytes(PROJECT_CONFIG.read_bytes())
        os.kill(gateway.proc.pid, signal.SIGHUP)
        _wait_for(gateway.log, "gateway: tools file reloaded")
        assert gateway.proc.poll() is None
    finally:
        gateway.stop()
