"""The README's FastAPI example, run as written: uvicorn on 127.0.0.1, a real worker of
`workers` serving tool.search_products, httpx sending a burst it must smooth and cut."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import ROOT, free_port, server, stop, write_config
from tests.support.workers import Cluster

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def readme_app() -> str:
    """The first Python block of the README's section on awaiting a call in asyncio."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Await a call in asyncio (FastAPI)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's FastAPI example is missing"
    return match.group(1)


def test_the_readme_fastapi_app_answers_smooths_and_falls_back(
    tmp_path: Path, redis_url: str, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    (tmp_path / "app.py").write_text(readme_app(), encoding="utf-8")
    tools = tomllib.loads((ROOT / "config" / "tools.toml").read_text(encoding="utf-8"))
    # 2 calls per 2 s, 3 s to wait: of 6 calls at once, 4 run (2 now, 2 at ~2 s) and the 2
    # whose slot (~4 s) lies past the deadline get the fallback.
    tools["tools"]["search_products"].update(limits=["2/2s"], max_delay="3s")
    config = write_config(tools, tmp_path / "tools.toml")
    env = {
        **os.environ, "THROTTLE_CONFIG": str(config), "THROTTLE_REDIS_URL": redis_url,
        "THROTTLE_BROKER_URL": redis_dbs[0], "THROTTLE_RESULT_BACKEND": redis_dbs[1],
        "THROTTLE_PREFIX": prefix, "THROTTLE_TASK_EVENTS": "0",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    log_dir = tmp_path / "worker"
    log_dir.mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
         "tool.search_products", "-c", "2", "-n", f"readme-{os.getpid()}@%h", "-l", "INFO",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=open(log_dir / "worker0.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        Cluster(env=env, queues="tool.search_products", log_dir=log_dir,
                procs=[worker]).wait_ready()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "uvicorn", "app:api", "--host", "127.0.0.1",
               "--port", str(port), "--app-dir", str(tmp_path)]
        with server(cmd, tmp_path / "uvicorn.log", f"{base}/docs", env=env):
            answers, took = asyncio.run(burst(base, 6))
            bad = httpx.get(f"{base}/search", params={"q": " ", "session": "s-1"})
    finally:
        stop(worker)
    outcomes = sorted(body["outcome"] for body in answers)
    print(f"\nREADME FastAPI app: outcomes {outcomes}, answered in "
          f"{', '.join(f'{s:.2f}s' for s in sorted(took))}")
    assert outcomes == ["fallback"] * 2 + ["result"] * 4
    fallback = tools["tools"]["search_products"]["fallback"]
    assert [b["answer"] for b in answers if b["outcome"] == "fallback"] == [fallback] * 2
    assert all(b["answer"]["source"] == "catalog" for b in answers if b["outcome"] == "result")
    assert sorted(took)[-2] >= 1.8 > sorted(took)[-3], "two calls waited for the next window"
    assert bad.status_code == 422 and "search_products" in bad.json()["detail"]


async def burst(base: str, count: int) -> tuple[list[dict[str, Any]], list[float]]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        async def one(i: int) -> tuple[dict[str, Any], float]:
            started = time.monotonic()
            response = await client.get("/search", params={"q": "usb-c hub", "session": f"s-{i}"})
            assert response.status_code == 200, response.text
            return response.json(), time.monotonic() - started

        done = await asyncio.gather(*(one(i) for i in range(count)))
    return [body for body, _ in done], [took for _, took in done]
