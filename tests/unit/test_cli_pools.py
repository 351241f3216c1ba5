"""`throttle worker -P`: every Celery pool passes through; an unknown pool or a green pool
whose package is missing is refused with the fix before celery starts."""

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
WORKER_DB = 13  # not one of the benchmarks (3-7) or the other tests (8-12)


@pytest.fixture(autouse=True)
def project_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("THROTTLE_CONFIG", raising=False)


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The argv each exec would have run (the exec would turn the test into a worker)."""
    calls: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    return calls


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    "pool_args",
    [["-P", "gevent"], ["--pool", "threads"], ["--pool=eventlet"], ["-Psolo"], ["-P", "prefork"]],
)
def test_every_celery_pool_passes_through_to_the_worker(
    pool_args: list[str], execs: list[list[str]]
) -> None:
    done = invoke("worker", "search_products", *pool_args, "-c", "50")
    assert done.exit_code == 0, done.output
    assert execs[0][-len(pool_args) - 2:] == [*pool_args, "-c", "50"]


def test_an_unknown_pool_is_refused_with_the_choices(execs: list[list[str]]) -> None:
    done = invoke("worker", "search_products", "-P", "greenlets")
    assert done.exit_code == 1
    message = " ".join(done.stderr.split())
    assert "-P greenlets: unknown worker pool; choose one of prefork, threads, gevent" in message
    assert execs == []


def test_a_green_pool_whose_package_is_missing_names_the_extra_to_install(
    execs: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gevent", None)  # what an absent package looks like
    done = invoke("worker", "search_products", "-P", "gevent", "-c", "50")
    assert done.exit_code == 1
    assert "pip install 'throttle[gevent]'" in " ".join(done.stderr.split())
    assert execs == []


def test_a_custom_pool_class_is_left_to_celery(execs: list[list[str]]) -> None:
    done = invoke("worker", "search_products", "-P", "mypkg.pools:TaskPool")
    assert done.exit_code == 0, done.output
    assert execs[0][-2:] == ["-P", "mypkg.pools:TaskPool"]


@pytest.mark.redis
@pytest.mark.celery
def test_a_real_gevent_worker_starts_with_pools_sized_for_its_concurrency(
    redis_url: str,
) -> None:
    broker = urlunsplit(urlsplit(redis_url)._replace(path=f"/{WORKER_DB}"))
    clean_db(broker)
    env = {**os.environ, "THROTTLE_BROKER_URL": broker, "THROTTLE_RESULT_BACKEND": broker}
    env.pop("THROTTLE_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "throttle.cli", "worker", "lookup_order", "-P", "gevent",
         "-c", "40", "-n", f"cli-gevent-{os.getpid()}@%h", "-l", "INFO", "--without-gossip",
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
        text = output.decode(errors="replace")
        assert "ready." in text, text
        assert "40 (gevent)" in text
        assert "throttle:" not in text  # no pool too small to warn about
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        clean_db(broker)
