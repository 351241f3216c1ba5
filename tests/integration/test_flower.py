"""`throttle flower` against real workers: login required, tool queues and workers shown, and
delayed and fallback calls told apart from plain results (API and a real browser)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.apps.ledger import build
from tests.support.monitoring import ledger_tool
from tests.support.needs import program
from tests.support.servers import free_port, server, throttle_cmd
from tests.support.workers import Cluster, ledger

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

USER, PASSWORD = "ops", "flower-test-Pw-7d1c"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@dataclass
class Flower:
    base: str
    log: Path
    cluster: Cluster

    def get(self, path: str, **params: Any) -> Any:
        answer = httpx.get(f"{self.base}{path}", params=params, auth=(USER, PASSWORD), timeout=10)
        return answer.raise_for_status().json()


@pytest.fixture
def flower(make_cluster: Any, tmp_path: Path) -> Iterator[Flower]:
    """Two workers of a 5/1s tool (task events on), and `throttle flower` in front of them."""
    cluster = make_cluster({"tools": {"burst": ledger_tool(["5/1s"], "2s")}})
    cluster.start(2, concurrency=2, extra=["-E"])
    port = free_port()
    env = {**cluster.env, "THROTTLE_FLOWER_USER": USER, "THROTTLE_FLOWER_PASSWORD": PASSWORD}
    env.pop("FLOWER_BASIC_AUTH", None)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "flower.log"
    cmd = throttle_cmd("flower", "--app", "tests.apps.ledger", "--port", str(port))
    with server(cmd, log, f"{base}/healthcheck", env=env, timeout_s=45):
        instance = Flower(base, log, cluster)
        deadline = time.monotonic() + 30
        while len(instance.get("/api/workers", refresh=1)) < 2:  # Flower sees both workers
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield instance
    assert PASSWORD not in log.read_text(errors="replace")


def test_flower_refuses_requests_without_the_login(flower: Flower) -> None:
    for path in ("/", "/tasks", "/api/workers", "/api/tasks"):
        assert httpx.get(f"{flower.base}{path}", timeout=10).status_code == 401, path
        wrong = httpx.get(f"{flower.base}{path}", auth=(USER, "wrong"), timeout=10)
        assert wrong.status_code == 401, path
    assert httpx.get(f"{flower.base}/", auth=(USER, PASSWORD), timeout=10).status_code == 200


def test_flower_shows_the_tool_queue_its_workers_and_delayed_and_fallback_calls(
    flower: Flower, redis_client: redis.Redis, prefix: str,
) -> None:
    workers = flower.get("/api/workers", refresh=1)
    assert len(workers) == 2
    for info in workers.values():
        assert [queue["name"] for queue in info["active_queues"]] == ["tool.burst"]
    queues = flower.get("/api/queues/length")["active_queues"]
    assert [queue["name"] for queue in queues] == ["tool.burst"]

    _, _, tasks = build(flower.cluster.env)
    results = [tasks["burst"].delay(n=n) for n in range(30)]
    delayed_while_waiting: dict[str, Any] = {}
    deadline = time.monotonic() + 5
    while not delayed_while_waiting and time.monotonic() < deadline:
        delayed_while_waiting = flower.get("/api/tasks", state="DELAYED")
        time.sleep(0.1)
    for result in results:
        result.get(timeout=60)
    runs = ledger(redis_client, prefix)
    plain = next(run["id"] for run in runs if run["delays"] == 0)
    delayed = next(run["id"] for run in runs if run["delays"] > 0)
    ran = {run["id"] for run in runs}
    fallbacks = [r.id for r in results if r.id not in ran]

    mark = "throttle: fallback (deadline)"
    deadline = time.monotonic() + 10  # events reach Flower a moment after the results
    while True:
        tasks = flower.get("/api/tasks")
        shown = {task_id: tasks.get(task_id, {}) for task_id in fallbacks}
        if all(info.get("state") == "SUCCESS" and info.get("traceback") == mark
               for info in shown.values()):
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    states = {task_id: info["state"] for task_id, info in tasks.items()}
    infos = {name: flower.get(f"/api/task/info/{task_id}")
             for name, task_id in (("plain", plain), ("delayed", delayed),
                                   ("fallback", fallbacks[0]))}
    print(f"\nflower: {len(runs)} ran, {len(fallbacks)} fell back; "
          f"{len(delayed_while_waiting)} shown DELAYED while waiting")
    assert delayed_while_waiting
    # A fallback is a success to Celery (its chain and chord go on); Flower tells it apart
    # by the fallback mark the worker's task-fallback event carries.
    assert {states[task_id] for task_id in fallbacks} == {"SUCCESS"}
    assert {states[task_id] for task_id in ran} == {"SUCCESS"}
    assert not any(tasks[task_id].get("traceback") for task_id in ran)
    assert infos["plain"]["state"] == "SUCCESS" and infos["plain"]["eta"] is None
    assert infos["delayed"]["state"] == "SUCCESS" and infos["delayed"]["eta"] is not None
    assert infos["fallback"]["state"] == "SUCCESS"
    assert infos["fallback"]["traceback"] == mark
    assert infos["fallback"]["result"] == repr({"n": -1})


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
         "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_headless_chromium_loads_the_dashboard_with_the_login(
    flower: Flower, tmp_path: Path,
) -> None:
    """The page a browser shows after its scripts ran (Chromium's --dump-dom) is Flower's
    dashboard listing both workers and the burst's tasks, not a 401 or an error page."""
    binary = program("chromium", "chromium")
    _, _, tasks = build(flower.cluster.env)
    ids = [result.id for result in [tasks["burst"].delay(n=n) for n in range(12)]]
    for task_id in ids:
        tasks["burst"].AsyncResult(task_id).get(timeout=60)
    workers = sorted(flower.get("/api/workers", refresh=1))
    host = flower.base.removeprefix("http://")
    pages = {}
    for page in ("workers", "tasks"):
        url = f"http://{USER}:{PASSWORD}@{host}/{'' if page == 'workers' else page}"
        shot = tmp_path / f"flower-{page}.png"
        chromium(binary, tmp_path / f"chromium-{page}", f"--screenshot={shot}", url)
        assert shot.exists(), f"{page}: no screenshot (a login prompt?)"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", page
        pages[page] = chromium(binary, tmp_path / f"chromium-{page}", "--dump-dom", url).stdout
    print(f"\ndashboard DOM: {', '.join(f'{p} {len(dom)} chars' for p, dom in pages.items())}")
    titles = {page: f"<title>{page.title()} · Flower</title>" for page in pages}
    for page, dom in pages.items():
        assert titles[page] in dom, (page, dom[:2000])
    assert all(f'title="{worker}"' in pages["workers"] for worker in workers), workers
    assert pages["workers"].count(">Online<") == len(workers) == 2
    assert any(task_id in pages["tasks"] for task_id in ids)
    assert "tool.burst" in pages["tasks"]
