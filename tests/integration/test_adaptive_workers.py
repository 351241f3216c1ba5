"""Two real worker nodes learn one shared effective limit from the stub upstream's headers.

The stub (`throttle stub-llm`, its own process) enforces a hidden token limit, 60% of the
pool's configured one, and reports it in OpenAI's headers; the pool is `adaptive`. The
first answer teaches the gate the real limit, in the pool's live-limits hash that both
nodes' decisions read: the burst after it is served without a 429.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import tomli_w
from celery import Celery

from tests.support.gateway import StubServer
from tests.support.workers import Cluster
from throttle import Throttle, outcome
from throttle.adaptive import read_states
from throttle.keys import pool_overrides_key
from workers.tools import llm

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOOL = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}}
MESSAGES = [{"role": "user", "content": "Note this."}]
CONFIGURED, HIDDEN, WINDOW_S = 2000, 1200, 2.0


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[StubServer]:
    process = StubServer(tmp_path / "stub.log", "--hidden-tokens", str(HIDDEN),
                         "--hidden-window", str(WINDOW_S), "--limit-headers", "openai")
    yield process
    process.stop()


def test_two_nodes_share_one_learned_limit(
    make_cluster: Callable[..., Cluster], tmp_path: Path, stub: StubServer, redis_url: str,
    prefix: str, redis_client: redis.Redis,
) -> None:
    document = tomllib.loads((ROOT / "config" / "tools.toml").read_text(encoding="utf-8"))
    document["pools"]["llm_tokens"].update(limits=[f"{CONFIGURED}/2s"], adaptive=True)
    document["tools"]["chat_completion"].update(limits=["1000000/2s"], max_delay="30s")
    path = tmp_path / "tools.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    cluster = make_cluster({"tools": {"chat_completion": {}}}, env={
        "THROTTLE_CONFIG": str(path), "THROTTLE_LLM_BASE_URL": stub.url})
    for index in range(2):
        log = (tmp_path / f"worker{index}.log").open("wb")
        cluster.procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
             "tool.chat_completion", "-c", "2", "-P", "threads", "-n",
             f"adapt{index}-{uuid.uuid4().hex[:6]}@%h", "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    cluster.wait_ready(timeout_s=60)
    app = Celery("adapt-test", broker=cluster.env["THROTTLE_BROKER_URL"],
                 backend=cluster.env["THROTTLE_RESULT_BACKEND"])
    throttle = Throttle(app, path, redis_url, prefix=prefix)
    task = throttle.tool("chat_completion")(llm.chat_completion)

    def call() -> object:
        return task.delay(messages=MESSAGES, tools=[TOOL], tool_choice="note",
                          model="stub-1", max_tokens=32)

    first = call()
    assert first.get(timeout=60)["source"] == "llm"
    [state] = read_states(redis_client, throttle.config, prefix)
    assert (state.configured, state.effective) == (CONFIGURED, HIDDEN)
    burst = [call() for _ in range(30)]
    values = [result.get(timeout=90) for result in burst]
    assert [outcome(result) for result in burst] == ["result"] * len(burst)
    stats = stub.stats()
    served_by = {value["model"] for value in values}
    print(f"\nstub statuses {stats['statuses']}, tokens {stats['total_tokens']}, "
          f"state {read_states(redis_client, throttle.config, prefix)}")
    assert served_by == {"stub-1"}
    assert stats["statuses"].get("429", 0) == 0  # every node admitted against the shared 1200
    for index in range(2):  # and both nodes served calls of the burst
        served = (tmp_path / f"worker{index}.log").read_text(errors="replace").count("succeeded")
        assert served >= 2, f"node {index} served {served} calls"
    fields = [f.decode() for f in redis_client.hkeys(pool_overrides_key(prefix, "llm_tokens"))]
    assert sorted(fields) == ["adaptive-state:pool", "adaptive:pool"]  # one limit, not one each
    logs = cluster.logs()
    assert "Traceback" not in logs, logs[-3000:]
