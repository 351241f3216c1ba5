"""`throttle status` and `throttle top`: the table read from Redis and the broker."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from tests.apps.ledger import build
from tests.support.monitoring import POOLED, ledger_tool, seed_pooled_state
from tests.support.servers import free_port, write_config
from tests.support.workers import ledger
from throttle import outcome
from throttle.cli import main
from throttle.config_file import load_config
from throttle.monitor.exporter import gauges
from throttle.monitor.snapshot import read_snapshot

pytestmark = [pytest.mark.redis]


def run(command: str, *args: str, redis_url: str, broker_url: str, prefix: str,
        config: Path, columns: int = 200) -> Result:
    done = CliRunner().invoke(main, [command, "--redis-url", redis_url, "--broker-url",
                                     broker_url, "--prefix", prefix, "--config", str(config),
                                     *args], env={"COLUMNS": str(columns)})
    assert done.exit_code == 0, done.output
    return done


def row_of(output: str, tool: str) -> list[str]:
    """The cells of `tool`'s row in the table."""
    line = next(line for line in output.splitlines() if f" {tool} " in line)
    return [cell.strip() for cell in line.strip("│┃ ").split("│")]


def test_status_shows_window_use_reservations_queue_cooldown_and_pool_use(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    seed_pooled_state(redis_url, prefix, *redis_dbs)
    config = write_config(POOLED, tmp_path / "tools.toml")
    output = run("status", redis_url=redis_url, broker_url=redis_dbs[0], prefix=prefix,
                 config=config).output
    print("\n" + output)
    light, heavy = row_of(output, "light"), row_of(output, "heavy")
    # tool, limits, in window, reserved, queued, waiting, admitted, delayed, fallback,
    # cooldown, pool
    assert light[1:6] == ["10/1m", "10/10 per 1m", "2", "3", "0"]
    assert heavy[1:6] == ["100/1m", "5/100 per 1m", "0", "0", "0"]
    assert light[10] == "shared/batch 75%" and heavy[10] == "shared/critical 38%"
    assert 20 < float(light[9].rstrip("s")) <= 30
    assert ("pool shared: 15/40 per 1m; class use critical 38% (share 1), batch 75% (share 0.5)"
            in output)


@pytest.mark.celery
@pytest.mark.slow
def test_status_counts_the_last_minute_of_decisions_that_workers_made(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_url: str,
    redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    tools = {"tools": {"tight": ledger_tool(["5/1s"], "1500ms")}}
    cluster = make_cluster(tools)
    cluster.start(1, concurrency=2)
    _, _, tasks = build(cluster.env)
    results = [tasks["tight"].delay(n=n) for n in range(30)]
    for result in results:
        result.get(timeout=60)
    runs = ledger(redis_client, prefix)
    delayed_calls = sum(run["delays"] > 0 for run in runs)
    decisions = sum(run["delays"] for run in runs)
    expected = [str(len(runs)),
                f"{delayed_calls} ({decisions})" if decisions != delayed_calls else str(decisions),
                str(sum(outcome(r) == "fallback" for r in results))]
    config = write_config(tools, tmp_path / "tools.toml")
    deadline = time.monotonic() + 15  # the workers flush every second
    while True:
        output = run("status", redis_url=redis_url, broker_url=redis_dbs[0], prefix=prefix,
                     config=config).output
        if row_of(output, "tight")[6:9] == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print("\n" + output)
    assert row_of(output, "tight")[6:9] == expected


def narrow_row(output: str, tool: str) -> list[str]:
    """The cells of `tool`'s row in the narrow table (columns two or more spaces apart)."""
    line = next(line for line in output.splitlines() if line.strip().startswith(f"{tool} "))
    return re.split(r"\s{2,}", line.strip())


def test_status_at_80_columns_shows_every_number_with_a_key(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    seed_pooled_state(redis_url, prefix, *redis_dbs)
    config = write_config(POOLED, tmp_path / "tools.toml")
    output = run("status", redis_url=redis_url, broker_url=redis_dbs[0], prefix=prefix,
                 config=config, columns=80).output
    print("\n" + output)
    assert max(len(line) for line in output.splitlines()) <= 80
    header = next(line for line in output.splitlines() if line.strip().startswith("tool "))
    assert header.split() == ["tool", "window", "rsv", "queue", "wait", "adm", "dly", "fb",
                              "cool", "pool"]
    light, heavy = narrow_row(output, "light"), narrow_row(output, "heavy")
    assert light[1:8] == ["10/10 1m", "2", "3", "0", "0", "0", "0"]
    assert heavy[1:8] == ["5/100 1m", "0", "0", "0", "0", "0", "0"]
    assert 20 < float(light[8].rstrip("s")) <= 30 and light[9] == "75%"
    assert heavy[9] == "38%"
    assert "rsv: reserved slots" in " ".join(output.split())  # the key, however it wraps
    assert "arriving/s" in output and "slots needed" in output


@pytest.mark.celery
@pytest.mark.slow
def test_status_advises_the_worker_slots_a_tool_needs_from_its_last_minute(
    make_cluster: Any, prefix: str, redis_url: str, redis_dbs: tuple[str, str],
    tmp_path: Path,
) -> None:
    tools = {"slow": ledger_tool(["10/1s"], "30s")}
    cluster = make_cluster({"tools": tools}, env={"THROTTLE_TEST_BODY_S": "0.2"})
    cluster.start(1, concurrency=4)
    _, _, tasks = build(cluster.env)
    for result in [tasks["slow"].delay(n=n) for n in range(24)]:
        result.get(timeout=60)
    time.sleep(2.5)  # the workers flush every second
    config = write_config({"tools": tools}, tmp_path / "tools.toml")
    output = run("status", redis_url=redis_url, broker_url=redis_dbs[0], prefix=prefix,
                 config=config, columns=80).output
    print("\n" + output)
    lines = output.splitlines()
    capacity = lines[next(i for i, line in enumerate(lines) if "capacity" in line):]
    row = narrow_row("\n".join(capacity), "slow")
    arriving, admitted, limit, body_ms, slots = map(float, row[1:6])
    assert arriving == admitted > 0 and limit == 10  # every call admitted
    assert 200 <= body_ms < 1000  # each body sleeps 0.2 s
    assert slots == pytest.approx(min(arriving, limit) * body_ms / 1000, abs=0.06)


def run_in_terminal(args: list[str], timeout_s: float = 30) -> str:
    """Run `throttle ARGS` on a pseudo-terminal (so rich redraws in place); its text."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "throttle.cli", *args], stdout=terminal, stderr=terminal,
        env={**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm"},
    )
    os.close(terminal)
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        try:
            chunk = os.read(controller, 65536) if ready else b""
        except OSError:  # the terminal closed: the command ended
            break
        if ready and not chunk:
            break
        out += chunk
    proc.wait(timeout=10)
    os.close(controller)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))  # no styles


def test_top_redraws_the_table_with_fresh_state_until_its_count_of_refreshes(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    seed_pooled_state(redis_url, prefix, *redis_dbs)
    config = write_config(POOLED, tmp_path / "tools.toml")
    output = run_in_terminal(["top", "--count", "3", "--interval", "0.5", "--redis-url",
                              redis_url, "--broker-url", redis_dbs[0], "--prefix", prefix,
                              "--config", str(config)])
    frames = output.split(f"prefix {prefix!r}")[1:]
    # Each frame shows the pool's cooldown as the snapshot read it: 3 reads, 0.5 s apart,
    # so 3 different values counting down (the first is drawn twice: start and refresh 1).
    cooldowns = [float(re.findall(r"cooldown (\d+\.\d)s", frame)[0]) for frame in frames]
    shown = sorted(set(cooldowns), reverse=True)
    print(f"\ntop --count 3: {len(frames)} frames, cooldowns {cooldowns}")
    assert len(frames) >= 4
    assert len(shown) == 3, cooldowns
    assert cooldowns == sorted(cooldowns, reverse=True)
    assert all("10/10 per 1m" in frame and "shared/batch 75%" in frame for frame in frames)
    narrow = run("top", "--count", "1", redis_url=redis_url, broker_url=redis_dbs[0],
                 prefix=prefix, config=config, columns=80).output
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert narrow_row(narrow, "light")[1:4] == ["10/10 1m", "2", "3"]


def test_status_names_the_redis_it_cannot_reach(tmp_path: Path, prefix: str) -> None:
    config = write_config(POOLED, tmp_path / "tools.toml")
    port = free_port()
    done = CliRunner().invoke(main, ["status", "--redis-url", f"redis://:secret@127.0.0.1:{port}/0",
                                     "--prefix", prefix, "--config", str(config)])
    assert done.exit_code == 1
    assert "cannot read the gate's Redis" in done.output
    assert f"127.0.0.1:{port}" in done.output and "secret" not in done.output


def test_status_shows_a_live_override_its_window_use_and_who_set_it(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], tmp_path: Path,
) -> None:
    seed_pooled_state(redis_url, prefix, *redis_dbs)
    config = write_config(POOLED, tmp_path / "tools.toml")
    set_args = ["limits", "set", "light", "20/1m", "5/1s", "--by", "ops@example",
                "--redis-url", redis_url, "--prefix", prefix, "--config", str(config)]
    done = CliRunner().invoke(main, set_args)
    assert done.exit_code == 0, done.output
    assert "light: 20/1m 5/1s (version 1, set by ops@example)" in done.output
    output = run("status", redis_url=redis_url, broker_url=redis_dbs[0], prefix=prefix,
                 config=config).output
    print("\n" + output)
    light = row_of(output, "light")
    assert light[1] == "20/1m, 5/1s (live)"
    assert light[2].startswith("10/20 per 1m")
    assert re.search(r"live limits light: 20/1m 5/1s, set by ops@example at \S+ \S+ "
                     r"\(version 1;", output)
    assert "its workers enforce" not in output
    # The exporter serves the same override, with who set it and its version.
    with redis.Redis.from_url(redis_url) as client:
        snapshot = read_snapshot(client, load_config(config), prefix)
    [sample] = next(family for family in gauges(snapshot)
                    if family.name == "throttle_live_limit_set_at_seconds").samples
    assert (sample.labels["target"], sample.labels["limits"], sample.labels["set_by"],
            sample.labels["version"]) == ("light", "20/1m 5/1s", "ops@example", "1"), sample
    assert abs(sample.value - time.time()) < 60
