"""SIGHUP reloads the tools file in a real `celery worker` (main and pool processes): a bad
file is refused with its ConfigError logged and the running limits kept; a good one applies
from the next call on, without a restart."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.apps.ledger import build
from tests.integration.test_celery_flow import tool
from tests.support.servers import write_config
from tests.support.workers import await_outcomes, ledger
from throttle import Throttle, load_config
from throttle.errors import ConfigError
from throttle.windows import most_in_window

pytestmark = [pytest.mark.redis]


def _config(limit: str) -> dict[str, Any]:
    return {"tools": {"hup": tool([limit], "30s")}}


def _wait_for(path: Path, text: str, count: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while path.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in:\n{path.read_text()[-3000:]}"
        time.sleep(0.1)


def _admitted_of(client: redis.Redis, prefix: str, ids: set[str]) -> list[float]:
    return [run["admitted_at"] for run in ledger(client, prefix) if run["id"] in ids]


@pytest.mark.celery
@pytest.mark.slow
def test_sighup_refuses_a_bad_file_keeping_the_old_limits_and_applies_a_good_one(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    path = write_config(_config("2/1s"), tmp_path / "tools.toml")
    cluster = make_cluster(_config("2/1s"), env={"THROTTLE_TEST_CONFIG_FILE": str(path)})
    cluster.start(1, concurrency=2)
    log = tmp_path / "worker0.log"
    _, _, tasks = build(cluster.env)
    main_pid = cluster.procs[0].pid

    path.write_text('[tools.hup]\nlimits = ["x/1s"]\nmax_delay = "30s"\n')
    os.kill(main_pid, signal.SIGHUP)
    _wait_for(log, "reload refused, the running config is kept", 1)
    assert "max 'x' must be a whole number" in log.read_text()
    assert cluster.procs[0].poll() is None
    first = [tasks["hup"].delay(n=i) for i in range(6)]
    assert await_outcomes(first, timeout_s=30)["result"] == 6
    old = _admitted_of(redis_client, prefix, {r.id for r in first})
    assert most_in_window(old, 1.0) <= 2  # still the old file's limit

    write_config(_config("6/1s"), path)
    os.kill(main_pid, signal.SIGHUP)
    _wait_for(log, "tools file reloaded", 1)
    time.sleep(1.1)  # the first batch leaves the window
    second = [tasks["hup"].delay(n=i) for i in range(6)]
    assert await_outcomes(second, timeout_s=30)["result"] == 6
    new = _admitted_of(redis_client, prefix, {r.id for r in second})
    print(f"\nbusiest second: {most_in_window(old, 1.0)} before, {most_in_window(new, 1.0)} "
          "after the reload")
    assert 2 < most_in_window(new, 1.0) <= 6
    assert cluster.procs[0].poll() is None


def test_reload_refuses_added_tools_and_a_config_not_read_from_a_file(tmp_path: Path) -> None:
    from celery import Celery

    path = write_config(_config("2/1s"), tmp_path / "tools.toml")
    throttle = Throttle(Celery("t", broker="memory://"), path)
    def hup(n: int) -> dict[str, int]:
        return {"n": n}

    throttle.tool(hup)
    both = {"tools": {**_config("3/1s")["tools"], "extra": tool(["1/1s"], "30s")}}
    write_config(both, path)
    with pytest.raises(ConfigError, match=r"tools added \['extra'\]"):
        throttle.reload()
    assert str(throttle.config.tool("hup").limits[0]) == "2/1s"
    write_config(_config("3/1s"), path)
    assert str(throttle.reload().tool("hup").limits[0]) == "3/1s"
    task = throttle.app.tasks["tool.hup"]
    assert str(task.tool.limits[0]) == "3/1s"  # the task's own view of its tool
    with pytest.raises(ConfigError, match="not a file that can be read again"):
        Throttle(Celery("u", broker="memory://"), load_config(_config("1/1s"))).reload()
