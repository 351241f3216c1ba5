"""`throttle demo` end to end, as a user runs it: embedded by default, and on the real Redis.

The demo's own summary (`summary.json`) is checked: every call answered, no window of any
limit ever held more admissions than the limit, and no window of the shared pool more than
its max, nor more than a class's allowance when that class admitted (measured on the gate's
admission logs). The sessions ask the model too: `chat_completion` calls the stub upstream
the demo starts, and the `llm_tokens` pool never holds more tokens in a window than its max.

On the real Redis the test does not take the demo's word for it: it reads the gate's logs
itself while the demo runs (`GateLogWatcher`) and checks every window of the e-commerce
tools and of their pool against the configured limits.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from click.testing import CliRunner

from tests.support.workers import clean_db
from throttle import load_config
from throttle.cli import main
from throttle.keys import reserved_in
from throttle.windows import most_in_window

ROOT = Path(__file__).resolve().parents[2]
BROKER_DB = 8
# Small runs whose searches still exceed their limit several times over: 10 sessions at the
# default 10x time scale, and 3 sessions at 4x (search_products 100/15s) on real workers.
# Searches are the pool's expensive class: they stop at 0.6 x 150 of the pool's window.
EMBEDDED_RUN = ["--sessions", "10", "--duration", "20"]
REAL_RUN = ["--sessions", "3", "--duration", "20", "--time-scale", "4"]
# Reading the status of a run needs a run long enough to be read, not a large one.
STATUS_RUN = ["--sessions", "3", "--duration", "8", "--time-scale", "4"]
EMBEDDED_BUDGET_S = 60
REAL_BUDGET_S = 90


class GateLogWatcher:
    """Reads every demo gate log of the `commerce_api` pool (each tool's and the pool's own)
    every 0.3 s; an entry stays there a whole window (15 s at 4x), so none is missed.
    Admissions are the logs' members that hold no reservation: member -> admission time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.admitted: dict[str, dict[str, float]] = defaultdict(dict)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            names = [key.decode() for key in self.client.scan_iter(
                match="throttle-demo-*:{commerce_api}:*log", count=1000)]
            pipe = self.client.pipeline(transaction=True)
            for name in names:
                pipe.zrange(name, 0, -1, withscores=True)
                pipe.zrange(name[: -len("log")] + "adm", 0, -1)  # (the pool has none)
            replies = pipe.execute()
            # A call the pool holds back has a slot in the pool's log too: an entry of a
            # member that holds a reservation in any tool is a slot, not an admission.
            pairs = zip(names, replies[::2], replies[1::2], strict=True)
            reserved = {member for name, log, admitted in pairs
                        if not name.endswith(":pool:log") for member in reserved_in(log, admitted)}
            for name, log in zip(names, replies[::2], strict=True):
                owner = "pool" if name.endswith(":pool:log") else name.split(":tool:")[1][:-4]
                for member, score in log:
                    if member not in reserved:
                        self.admitted[owner][member.decode()] = score / 1000

    def __enter__(self) -> GateLogWatcher:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def check_gate_logs(watcher: GateLogWatcher, summary: dict[str, Any], time_scale: int) -> None:
    """Every window of the configured (time-scaled) limits, read from the gate's own logs."""
    config = load_config(ROOT / "config" / "tools.toml")
    pool = config.pools["commerce_api"]
    checks = {name: config.tool(name).limits for name in
              ("search_products", "get_inventory", "lookup_order", "process_refund")}
    checks["pool"] = pool.limits
    report = []
    for owner, limits in checks.items():
        times = list(watcher.admitted[owner].values())
        for limit in limits:
            window_s = limit.window_ms / 1000 / time_scale
            most = most_in_window(times, window_s)
            report.append(f"{owner} {most}/{limit.max:g} per {window_s:g}s")
            assert most <= limit.max, (owner, most, limit)
        if owner != "pool":
            # The demo's own count of admissions agrees with the gate's log.
            assert len(times) == summary["tools"].get(owner, {"admitted": 0})["admitted"], owner
    tools_admitted = sum(len(watcher.admitted[name]) for name in checks if name != "pool")
    assert len(watcher.admitted["pool"]) == tools_admitted
    assert len(watcher.admitted["search_products"]) > config.tool("search_products").limits[0].max
    print("\ngate logs, read by the test: " + "; ".join(report))


def run_demo(out: Path, args: list[str], env: dict[str, str], timeout_s: float) -> tuple[
    subprocess.CompletedProcess[str], float
]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "throttle.cli", "demo", *args, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s * 2,
    )
    return done, time.monotonic() - started


def demo_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("THROTTLE_REDIS_URL", "THROTTLE_CONFIG")}
    return {**env, "COLUMNS": "200", **extra}


def check_summary(out: Path, mode: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == mode
    assert (out / "throttle-demo.png").read_bytes().startswith(b"\x89PNG")
    tools = summary["tools"]
    assert {"search_products", "get_inventory", "lookup_order"} <= set(tools)
    for name, tool in tools.items():
        assert tool["unanswered"] == 0, name
        assert tool["calls"] == tool["admitted"] + tool["fallbacks"], name
        for limit in tool["limits"]:
            assert 0 < limit["most_admitted"] <= limit["max"], (name, limit)
    pool = summary["pools"]["commerce_api"]
    for check in pool["limits"]:
        assert 0 < check["most_used"] <= check["allowed"], check
    classes = {item["priority"]: item for item in pool["classes"]}
    assert set(classes) == {"critical", "standard", "expensive"}
    for name, item in classes.items():
        for check in item["limits"]:
            assert check["most_used"] <= check["allowed"], (name, check)
    assert sum(item["admitted"] for item in classes.values()) == pool["admitted"]
    assert pool["admitted"] == sum(tool["admitted"] for name, tool in tools.items()
                                   if name != "chat_completion")
    llm, tokens = tools["chat_completion"], summary["pools"]["llm_tokens"]
    assert llm["calls"] > 0 and llm["admitted"] > 0, llm
    for check in tokens["limits"]:
        assert 0 < check["most_used"] <= check["allowed"], check
    print(f"\n{mode}: chat_completion {llm['calls']} calls, {llm['admitted']} answered, "
          f"{llm['fallbacks']} fallbacks; llm_tokens most in a window "
          f"{tokens['limits'][0]['most_used']:g}/{tokens['limits'][0]['allowed']:g}")
    search, expensive = tools["search_products"], classes["expensive"]
    print(f"\n{mode}: search_products {search['calls']} calls, {search['admitted']} admitted "
          f"({search['delayed']} delayed, {expensive['delayed_by_pool']} by the pool), "
          f"{search['fallbacks']} fallbacks, most in a window "
          f"{search['limits'][0]['most_admitted']:g}/{search['limits'][0]['max']}; pool "
          f"{pool['limits'][0]['most_used']:g}/{pool['limits'][0]['allowed']:g}, at search "
          f"admissions {expensive['limits'][0]['most_used']:g}/"
          f"{expensive['limits'][0]['allowed']:g}")
    assert search["calls"] > search["limits"][0]["max"], "the burst exceeds the limit"
    assert search["delayed"] > 0, "calls over the limit wait for their slot"
    # The share binds: searches waited while the pool held their class's allowance (a wait
    # counts only if the pool could not take the search within it). The most in use at a
    # search's admission is the allowance only if the last search before the pool filled
    # came before the other classes' calls did: 89 of 90 when a critical call came first.
    assert expensive["delayed_by_pool"] > 0, "searches over their share wait for the pool"
    return summary


@pytest.mark.emulation
@pytest.mark.slow
def test_the_embedded_demo_runs_to_its_summary_within_budget_and_never_exceeds_a_limit(
    tmp_path: Path,
) -> None:
    done, took_s = run_demo(tmp_path, EMBEDDED_RUN, demo_env(), EMBEDDED_BUDGET_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert took_s < EMBEDDED_BUDGET_S, f"took {took_s:.1f}s"
    assert "embedded mode" in done.stdout
    assert "THROTTLE_REDIS_URL=redis://127.0.0.1:6379/0 throttle demo" in done.stdout
    banner = "".join(done.stdout.split())
    assert "100/1m→100/6s" in banner, "the banner says how time is scaled"
    assert "poolcommerce_api150/1m→150/6s" in banner, "pool windows are scaled too"
    assert "Summary" in done.stdout and "most admitted in any window" in done.stdout
    assert "Pool commerce_api (150/6s) per priority class" in done.stdout
    for row in ("critical", "standard", "expensive", "all classes", "delayed by the pool"):
        assert row in done.stdout, row
    assert "Traceback" not in done.stdout + done.stderr
    check_summary(tmp_path, "embedded")


@pytest.mark.redis
@pytest.mark.celery
@pytest.mark.slow
def test_the_real_demo_runs_on_redis_with_worker_processes_and_leaves_no_keys(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    broker = urlunsplit(urlsplit(redis_url)._replace(path=f"/{BROKER_DB}"))
    clean_db(broker)
    try:
        env = demo_env(THROTTLE_REDIS_URL=redis_url)
        with GateLogWatcher(redis_client) as watcher:
            done, took_s = run_demo(tmp_path, [*REAL_RUN, "--broker", broker], env,
                                    REAL_BUDGET_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert took_s < REAL_BUDGET_S, f"took {took_s:.1f}s"
        assert "real Redis and worker processes" in done.stdout
        summary = check_summary(tmp_path, "real")
        check_gate_logs(watcher, summary, time_scale=int(REAL_RUN[-1]))
        assert summary["prefix"].startswith("throttle-demo-")
        assert list(redis_client.scan_iter(match=f"{summary['prefix']}:*")) == []
        broker_client = redis.Redis.from_url(broker)
        assert list(broker_client.scan_iter(match="celery-task-meta-*")) == []
        assert [key for key in broker_client.scan_iter(match="tool.*")] == []
        broker_client.close()
    finally:
        clean_db(broker)


def printed_command(line: str) -> list[str]:
    """A command line from the banner, without the panel's borders."""
    return shlex.split(line.strip().strip("│").strip())


@pytest.mark.redis
@pytest.mark.celery
@pytest.mark.slow
def test_the_real_demo_prints_the_status_command_that_reads_its_run_and_status_warns_without_it(
    tmp_path: Path, redis_url: str,
) -> None:
    broker = urlunsplit(urlsplit(redis_url)._replace(path=f"/{BROKER_DB}"))
    clean_db(broker)
    env = demo_env(THROTTLE_REDIS_URL=redis_url, PYTHONUNBUFFERED="1", COLUMNS="400")
    demo = subprocess.Popen(
        [sys.executable, "-m", "throttle.cli", "demo", *STATUS_RUN, "--broker", broker,
         "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        assert demo.stdout is not None
        commands: dict[str, list[str]] = {}
        for line in demo.stdout:
            if "throttle status --redis-url" in line or "throttle exporter --port" in line:
                command = printed_command(line)
                commands[command[1]] = command
            if len(commands) == 2:
                break
        status, exporter = commands["status"], commands["exporter"]
        assert status[status.index("--redis-url") + 1] == redis_url
        prefix = status[status.index("--prefix") + 1]
        assert prefix.startswith("throttle-demo-") and exporter[-6:] == status[-6:]
        runner, shown, warned = CliRunner(), "", ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not ("per 15s" in shown and "warning" in warned):
            shown = runner.invoke(main, status[1:], env={"COLUMNS": "200"}).output
            # The same run read with the default tools file: its windows are a minute long.
            default = status[1:status.index("--config")]
            warned = runner.invoke(main, default, env={"COLUMNS": "200",
                                                       "THROTTLE_CONFIG": ""}).output
            time.sleep(0.5)
        print("\n" + shown + "\n" + warned)
        assert "per 15s" in shown and "warning" not in shown
        assert ("warning: search_products: its workers enforce 100/15s, but "
                in " ".join(warned.split()))
        assert demo.wait(timeout=REAL_BUDGET_S * 2) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        clean_db(broker)


@pytest.mark.redis
@pytest.mark.celery
@pytest.mark.slow
def test_the_real_demo_with_keep_uses_the_default_prefix_and_status_reads_it_afterwards(
    tmp_path: Path,
) -> None:
    """On a redis-server of its own: the default prefix of a shared server is nobody's to
    fill or empty."""
    from tests.support.servers import private_redis
    from throttle.keys import DEFAULT_PREFIX

    with private_redis(tmp_path / "redis") as server:
        redis_url, broker = server.url(0), server.url(BROKER_DB)
        client = redis.Redis.from_url(redis_url)
        env = demo_env(THROTTLE_REDIS_URL=redis_url, COLUMNS="400")
        done, _ = run_demo(tmp_path, [*REAL_RUN, "--broker", broker, "--keep"], env,
                           REAL_BUDGET_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert check_summary(tmp_path, "real")["prefix"] == DEFAULT_PREFIX
        status = next(printed_command(line) for line in done.stdout.splitlines()
                      if "throttle status --redis-url" in line)
        assert "--prefix" not in status  # the default, as the README runs it
        assert status[status.index("--config") + 1] == str(tmp_path / "tools.toml")
        assert list(client.scan_iter(match=f"{DEFAULT_PREFIX}:*"))  # kept
        shown = CliRunner().invoke(main, status[1:], env={"COLUMNS": "200"}).output
        print("\n" + shown)
        assert "per 15s" in shown and "warning" not in shown
        assert "search_products" in shown
        client.close()


def test_keep_needs_a_real_redis() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "throttle.cli", "demo", "--keep", "--sessions", "1"],
        cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "--keep needs THROTTLE_REDIS_URL" in done.stdout + done.stderr


def test_the_demo_runs_a_runaway_session_shared_fairly_and_sums_up_the_others_waits(
    tmp_path: Path,
) -> None:
    args = ["--sessions", "3", "--duration", "6", "--runaway", "300",
            "--fair-by", "session_id"]
    done, _ = run_demo(tmp_path, args, demo_env(), EMBEDDED_BUDGET_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "runaway session-000 (" in done.stdout
    assert "(shared fairly by session_id)" in "".join(done.stdout.split("\n"))
    summary = check_summary(tmp_path, "embedded")
    assert (summary["runaway"], summary["fair_by"]) == (300, "session_id")
    waits = summary["session_waits"]
    assert waits["runaway"]["calls"] > 300 and waits["others"]["calls"] > 0
    assert waits["others"]["max_s"] is not None
