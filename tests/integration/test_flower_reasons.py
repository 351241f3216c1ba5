"""Flower's task page says why a call waited or fell back, how long, and when it was first
sent (real workers sending events, `throttle flower`, headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.apps.ledger import build
from tests.support.monitoring import ledger_tool
from tests.support.servers import free_port, server, throttle_cmd
from tests.support.workers import ledger
from throttle import outcome

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

USER, PASSWORD = "ops", "flower-reasons-Pw-41c9"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium(binary: str, url: str, profile: Path, *mode: str) -> str:
    """Run headless Chromium on `url` (with the login); its stdout."""
    profile.mkdir()
    done = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1900",
         "--virtual-time-budget=5000", *mode, url],
        capture_output=True, timeout=60, check=False, text=True,
    )
    return done.stdout


def test_flowers_task_page_shows_the_reason_the_wait_and_the_first_sent_time(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, tmp_path: Path,
) -> None:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's chromium "
                    "package where apt-get can)")
    cluster = make_cluster({
        "pools": {"api": {"limits": ["4/2s"], "shares": {"critical": 1.0, "standard": 0.5}}},
        "tools": {"bulk": ledger_tool(["100/1s"], "30s", pool="api", priority="standard")},
    })
    cluster.start(1, concurrency=2, extra=["-E"])
    port = free_port()
    env = {**cluster.env, "THROTTLE_FLOWER_USER": USER, "THROTTLE_FLOWER_PASSWORD": PASSWORD}
    env.pop("FLOWER_BASIC_AUTH", None)
    base = f"http://127.0.0.1:{port}"
    cmd = throttle_cmd("flower", "--app", "tests.apps.ledger", "--port", str(port))
    with server(cmd, tmp_path / "flower.log", f"{base}/healthcheck", env=env, timeout_s=45):
        deadline = time.monotonic() + 30
        while not httpx.get(f"{base}/api/workers", params={"refresh": 1},
                            auth=(USER, PASSWORD), timeout=10).json():
            assert time.monotonic() < deadline
            time.sleep(0.5)
        _, _, tasks = build(cluster.env)
        sent_at = time.time()
        results = [tasks["bulk"].delay(n=i) for i in range(5)]
        late = tasks["bulk"].apply_async(kwargs={"n": 99}, deadline_s=1.0)  # pool full: falls back
        for result in [*results, late]:
            result.get(timeout=30)
        assert outcome(late) == "fallback"
        delayed = next(run["id"] for run in ledger(redis_client, prefix) if run["delays"] > 0)

        pages: dict[str, str] = {}
        deadline = time.monotonic() + 10  # events reach Flower a moment after the results
        for name, task_id in (("delayed", delayed), ("fallback", late.id)):
            while "Decision" not in pages.get(name, ""):
                assert time.monotonic() < deadline, pages.get(name, "")[-2000:]
                time.sleep(0.3)
                pages[name] = httpx.get(f"{base}/task/{task_id}", auth=(USER, PASSWORD),
                                        timeout=10).text

        login = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
        shot = tmp_path / "flower-task-delayed.png"
        chromium(binary, f"{login}/task/{delayed}", tmp_path / "shot", f"--screenshot={shot}")
        dom = chromium(binary, f"{login}/task/{delayed}", tmp_path / "dom", "--dump-dom")

    text = re.sub(r"<[^>]+>", " ", dom)
    text = re.sub(r"\s+", " ", text)
    shown = re.search(r"Decision .{0,160}", text)
    print(f"\nflower task page of {delayed}: {shown.group(0) if shown else text[:300]}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000
    assert re.search(r"Decision delayed \d+\.\d s \(pool api/standard\)", text)
    assert re.search(r"Reason pool", text) and re.search(r"Wait s \d+\.\d+", text)
    first_sent = re.search(r"First sent (\S+)", text)
    assert first_sent is not None
    assert abs(datetime.fromisoformat(first_sent.group(1)).timestamp() - sent_at) < 5
    fallback = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", pages["fallback"]))
    assert "Decision fallback (deadline)" in fallback and "Reason deadline" in fallback
