"""The `throttle` command: `check` exit codes and messages, `worker` tool names and argv."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from click.testing import CliRunner, Result

from tests.support.workers import clean_db
from throttle.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ["search_products", "get_inventory", "lookup_order", "process_refund"]
WORKER_DB = 14  # of its own: benchmarks use 3-7, the demo tests 8, pytest-xdist workers 9-12


@pytest.fixture(autouse=True)
def project_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command reads the project's own config unless a test says otherwise."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("THROTTLE_CONFIG", raising=False)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_check_of_the_default_config_exits_0_and_tables_every_tool_with_its_queue() -> None:
    done = invoke("check")
    assert done.exit_code == 0, done.output
    for tool in TOOLS:
        assert tool in done.stdout
        assert f"tool.{tool}" in done.stdout
    assert "100/1m" in done.stdout


def test_check_of_a_broken_file_exits_1_and_prints_the_config_error(tmp_path: Path) -> None:
    path = tmp_path / "tools.toml"
    path.write_text('[tools.search]\nlimits = ["100/60s"]\nmax_delay = "2h"\n', encoding="utf-8")
    done = invoke("check", str(path))
    assert done.exit_code == 1
    message = "".join(done.stderr.split())
    assert "".join(f"{path}: tool 'search', field 'max_delay'".split()) in message
    assert "visibility_timeout" in done.stderr
    assert done.stdout == ""


def test_check_reads_throttle_config_when_no_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[tools.echo]\nlimits = "3/s"\nmax_delay = "1s"\n', encoding="utf-8")
    monkeypatch.setenv("THROTTLE_CONFIG", str(path))
    done = invoke("check")
    assert done.exit_code == 0, done.output
    assert "echo" in done.stdout and "search_products" not in done.stdout


def test_worker_with_an_unknown_tool_exits_1_listing_the_known_tools() -> None:
    done = invoke("worker", "search_products", "refund_everything", "-c", "2")
    assert done.exit_code == 1
    assert "unknown tool(s) refund_everything" in done.stderr
    for tool in TOOLS:
        assert tool in done.stderr


def test_worker_without_a_tool_exits_1_listing_the_known_tools() -> None:
    done = invoke("worker", "--concurrency", "2")
    assert done.exit_code == 1
    assert "name at least one tool" in done.stderr
    assert all(tool in done.stderr for tool in TOOLS)


def test_worker_with_a_broken_throttle_config_exits_1_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tools.toml"
    path.write_text("[tools.x]\n", encoding="utf-8")
    monkeypatch.setenv("THROTTLE_CONFIG", str(path))
    done = invoke("worker", "x")
    assert done.exit_code == 1
    assert "field 'max_delay': required" in done.stderr


def test_worker_execs_celery_with_the_tools_queues_and_passes_its_options_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The exec itself is replaced here: it would turn the test process into a worker.
    # `test_worker_starts_a_real_celery_worker_on_the_tools_queue` runs the real one.
    calls: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append([path, *argv])
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    done = invoke("worker", "search_products", "get_inventory", "-c", "4", "--loglevel", "INFO")
    assert done.exit_code == 0, done.output
    assert calls == [[
        sys.executable, sys.executable, "-m", "celery", "-A", "workers", "worker",
        "-Q", "tool.search_products,tool.get_inventory", "-c", "4", "--loglevel", "INFO",
    ]]


@pytest.mark.redis
@pytest.mark.celery
def test_worker_starts_a_real_celery_worker_on_the_tools_queue(redis_url: str) -> None:
    broker = urlunsplit(urlsplit(redis_url)._replace(path=f"/{WORKER_DB}"))
    clean_db(broker)
    env = {**os.environ, "THROTTLE_BROKER_URL": broker, "THROTTLE_RESULT_BACKEND": broker}
    env.pop("THROTTLE_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "throttle.cli", "worker", "lookup_order", "-P", "solo",
         "-n", f"cli-test-{os.getpid()}@%h", "-l", "INFO", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while b"ready." not in output and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output += line
        assert b"ready." in output, output.decode(errors="replace")
        text = output.decode(errors="replace")
        assert "tool.lookup_order" in text
        assert "tool.search_products" not in text.split("[tasks]")[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        clean_db(broker)
