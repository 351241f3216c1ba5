"""The LLM tool through real `celery -A workers worker` processes against the stub upstream.

Everything is real: the stub is `throttle stub-llm` in its own process on 127.0.0.1, the
workers call it over HTTP, the gate runs on the real Redis. Each test reads the stub's own
request log (arrival times, statuses, tokens) through its admin endpoint.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import tomli_w
from celery import Celery
from jsonschema import Draft202012Validator

from tests.support.gateway import StubServer, every_value
from tests.support.pools import missing
from tests.support.servers import free_port, server, throttle_cmd
from tests.support.workers import Cluster
from throttle import Config, Throttle, outcome
from throttle.keys import tool_keys
from throttle.task import fallback_reason
from throttle.tokens import prompt_tokens
from throttle.windows import most_in_window
from workers.tools import llm

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "tools.toml"
WEATHER_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["city", "unit", "days", "tags", "where"],
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "where": {"type": "object", "required": ["lat", "lon"],
                  "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                 "lon": {"type": "number"}}},
        "note": {"type": "string"},
    },
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city", "parameters": WEATHER_SCHEMA}}
MESSAGES = [{"role": "system", "content": "You call tools."},
            {"role": "user", "content": "What will the weather be in Lyon this week?"}]


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[StubServer]:
    process = StubServer(tmp_path / "stub.log", "--latency", "0.05")
    yield process
    process.stop()


@dataclass
class LLMStack:
    """Worker processes serving `chat_completion`, and a client task of the same name."""

    cluster: Cluster
    config: Config
    task: Any
    stub: StubServer

    def call(self, **kwargs: Any) -> Any:
        arguments = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "get_weather",
                     "model": "stub-1", "max_tokens": 64, **kwargs}
        return self.task.delay(**{k: v for k, v in arguments.items() if v is not None})


@pytest.fixture
def llm_stack(
    make_cluster: Callable[..., Cluster], tmp_path: Path, stub: StubServer, redis_url: str,
    prefix: str,
) -> Callable[..., LLMStack]:
    """Call to start `workers` worker processes on `tool.chat_completion` (config overrides
    and extra environment as keywords)."""

    def start(
        *, workers: int = 1, concurrency: int = 1, pool: str = "prefork", level: str = "INFO",
        env: dict[str, str] | None = None, pool_limits: tuple[str, ...] = ("1000000/60s",),
        max_delay: str = "30s", slot_margin: str | None = None,
    ) -> LLMStack:
        document = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
        document["pools"]["llm_tokens"]["limits"] = list(pool_limits)
        document["tools"]["chat_completion"].update(limits=["10000000/60s"], max_delay=max_delay)
        if slot_margin is not None:
            document["tools"]["chat_completion"]["slot_margin"] = slot_margin
        path = tmp_path / "tools.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        cluster = make_cluster({"tools": {"chat_completion": {}}}, env={
            "THROTTLE_CONFIG": str(path), "THROTTLE_LLM_BASE_URL": stub.url,
            "THROTTLE_LLM_API_KEY": "test-key", "THROTTLE_LLM_BACKOFF_S": "0.2",
            **(env or {}),
        })
        for index in range(workers):
            log = (tmp_path / f"worker{index}.log").open("wb")
            cluster.procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
                 "tool.chat_completion", "-c", str(concurrency), "-P", pool, "-n",
                 f"llm{index}-{uuid.uuid4().hex[:6]}@%h", "-l", level, "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            ))
        cluster.wait_ready(timeout_s=60)
        app = Celery("llm-test", broker=cluster.env["THROTTLE_BROKER_URL"],
                     backend=cluster.env["THROTTLE_RESULT_BACKEND"])
        throttle = Throttle(app, path, redis_url, prefix=prefix)
        task = throttle.tool("chat_completion")(llm.chat_completion)
        return LLMStack(cluster, throttle.config, task, stub)

    return start


def failure_of(result: Any, timeout_s: float = 30) -> BaseException:
    """The exception a failed call raises for its caller."""
    with pytest.raises(Exception) as info:
        result.get(timeout=timeout_s)
    return info.value


# --- 1. a forced tool call, checked against the schema ------------------------------------


def test_a_forced_tool_call_round_trips_through_a_worker_and_fits_the_tool_s_schema(
    llm_stack: Callable[..., LLMStack], redis_client: redis.Redis, prefix: str
) -> None:
    stack = llm_stack()
    first = stack.call()
    named = stack.call(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    only = stack.call(tool_choice=None)
    values = [r.get(timeout=60) for r in (first, named, only)]

    result_schema = Draft202012Validator(stack.config.tool("chat_completion").result)
    expected_prompt = prompt_tokens(MESSAGES, [WEATHER])
    keys = tool_keys(prefix, "chat_completion", pool="llm_tokens")
    for result, value in zip((first, named, only), values, strict=True):
        assert outcome(result) == "result"
        assert list(result_schema.iter_errors(value)) == []
        assert value["source"] == "llm" and value["tool"] == "get_weather"
        assert list(Draft202012Validator(WEATHER_SCHEMA).iter_errors(value["arguments"])) == []
        assert value["usage"]["prompt_tokens"] == expected_prompt
        # The gate's charge was settled from the estimate to the upstream's usage.
        settled = float(redis_client.hget(keys.pool_cost, result.id) or 1)
        assert settled == value["usage"]["total_tokens"]
    stats = stack.stub.stats()
    estimate = llm.estimate_tokens({"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 64})
    print(f"\nround trip: arguments {values[0]['arguments']}, usage {values[0]['usage']}, "
          f"estimate {estimate}")
    assert stats["requests"] == 3 and stats["statuses"] == {"200": 3}
    assert stats["total_tokens"] == sum(v["usage"]["total_tokens"] for v in values)


def test_an_answer_without_the_forced_call_or_with_bad_arguments_fails_with_a_clear_message(
    llm_stack: Callable[..., LLMStack],
) -> None:
    stack = llm_stack()
    expected = {
        "text": "did not call the forced tool 'get_weather'",
        "bad_json": "arguments for 'get_weather' are not valid JSON",
        "invalid": "break the tool's schema at arguments: 'city' is a required property",
    }
    for mode, message in expected.items():
        stack.stub.configure(answer=mode)
        error = failure_of(stack.call())
        assert type(error).__name__ == "ModelAnswerError", error
        assert message in str(error)
    stack.stub.configure(answer="tool_call")
    wrong = failure_of(stack.call(tool_choice="get_news"))
    assert "'get_news' is not one of the tools ['get_weather']" in str(wrong)
    assert stack.call().get(timeout=30)["source"] == "llm"  # the worker is fine


# --- 2. the TPM budget ---------------------------------------------------------------------


class PoolWatcher(threading.Thread):
    """Reads the pool's admission log and charges every 50 ms (entries leave it after a window)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.keys = tool_keys(prefix, "chat_completion", pool="llm_tokens")
        self.seen: dict[str, tuple[float, float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.poll()

    def poll(self) -> None:
        assert self.keys.pool_log and self.keys.pool_cost
        pipe = self.client.pipeline(transaction=False)
        pipe.zrange(self.keys.pool_log, 0, -1, withscores=True)
        pipe.hgetall(self.keys.pool_cost)
        entries, costs = pipe.execute()
        for member, score in entries:
            self.seen[member.decode()] = (score / 1000, float(costs.get(member, 1)))


# On gevent a call reaches the upstream when its greenlet next runs: while a node's 20 calls
# meet the gate at once, the first admitted ones arrived 40-110 ms after admission, past the
# default margin's 20 ms. docs/gate.md tells green pools to raise slot_margin; so does this.
@pytest.mark.parametrize(("pool", "concurrency", "slot_margin"), [
    ("prefork", 1, None),
    pytest.param("gevent", 20, "300ms", marks=pytest.mark.skipif(
        missing("gevent"), reason="pip install 'throttle[gevent]'")),
])
def test_a_burst_of_random_prompts_stays_within_the_token_budget_in_every_window(
    llm_stack: Callable[..., LLMStack], redis_client: redis.Redis, prefix: str, pool: str,
    concurrency: int, slot_margin: str | None,
) -> None:
    budget, window_s = 1500, 2.0
    stack = llm_stack(workers=2, concurrency=concurrency, pool=pool, slot_margin=slot_margin,
                      pool_limits=(f"{budget}/2s",), max_delay="60s")
    rng = random.Random(5)
    words = ["weather", "forecast", "rain", "Lyon", "sunny", "wind", "tomorrow", "cold"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 400)))
               for _ in range(24)]
    watcher = PoolWatcher(redis_client, prefix)
    watcher.start()
    started = time.time()
    calls = [stack.call(messages=[{"role": "user", "content": p}], max_tokens=40)
             for p in prompts]
    values = [r.get(timeout=90) for r in calls]
    elapsed = time.time() - started
    watcher.done.set()
    watcher.join()
    watcher.poll()

    assert all(outcome(r) == "result" for r in calls)
    estimates = [llm.estimate_tokens({"messages": [{"role": "user", "content": p}],
                                      "tools": [WEATHER], "max_tokens": 40}) for p in prompts]
    used = [v["usage"]["total_tokens"] for v in values]
    admitted = [watcher.seen[r.id] for r in calls]
    peak = most_in_window([at for at, _ in admitted], window_s, [n for _, n in admitted])
    stats = stack.stub.stats()
    arrivals = [(e["at"], e["prompt_tokens"] + e["completion_tokens"]) for e in stats["log"]]
    at_stub, at_stub_short = (
        most_in_window([at for at, _ in arrivals], window_s - slack, [n for _, n in arrivals])
        for slack in (0, 0.5)
    )
    print(f"\nTPM (-P {pool} -c {concurrency}): {len(calls)} calls, estimates "
          f"{min(estimates)}-{max(estimates)} tokens (sum {sum(estimates)}), used sum "
          f"{sum(used)}; most admitted in any {window_s:g}s window after settlement "
          f"{peak:.0f} of {budget}; at the stub's arrival times {at_stub:.0f} in "
          f"{window_s:g}s, {at_stub_short:.0f} in {window_s - 0.5:g}s; {elapsed:.1f}s, "
          f"{sum(used) / elapsed * window_s:.0f} tokens per window on average")
    assert [cost for _, cost in admitted] == used  # every charge settled to its usage
    assert all(e >= u for e, u in zip(estimates, used, strict=True))
    assert peak <= budget
    # The upstream counts arrivals, some ms after admission: the pool's windows are checked
    # with half the slot margin added, so the upstream's windows hold the budget when every
    # request arrives within margin/2 of its admission. Requests are matched to their calls
    # by their token count (in order among equal counts); one that arrived later on a loaded
    # machine is counted at admission + margin/2, the latest arrival the promise covers.
    half_margin_s = stack.config.tool("chat_completion").slot_margin_ms / 1000 / 2
    arrivals_by_tokens: dict[int, list[float]] = defaultdict(list)
    for at, tokens in sorted(arrivals):
        arrivals_by_tokens[tokens].append(at)
    admitted_by_tokens: dict[int, list[float]] = defaultdict(list)
    for (at, _), tokens in sorted(zip(admitted, used, strict=True)):
        admitted_by_tokens[tokens].append(at)
    lags = [(arrived - at, arrived, tokens) for tokens, ats in admitted_by_tokens.items()
            for at, arrived in zip(ats, arrivals_by_tokens[tokens], strict=True)]
    covered = [(arrived - max(0.0, lag - half_margin_s), tokens) for lag, arrived, tokens in lags]
    late = sum(lag > half_margin_s for lag, _, _ in lags)
    print(f"arrival lag after admission: max {max(lag for lag, _, _ in lags) * 1000:.0f} ms, "
          f"{late} of {len(lags)} later than margin/2")
    assert min(lag for lag, _, _ in lags) >= 0
    assert most_in_window([at for at, _ in covered], window_s, [n for _, n in covered]) <= budget
    assert stats["total_tokens"] == sum(used) and stats["requests"] == len(calls)
    assert elapsed >= (sum(used) - budget) / budget * window_s * 0.9  # it was throttled


# --- 3. 429 with Retry-After: a cooldown for every worker -----------------------------------


def test_a_429_pauses_every_worker_for_its_retry_after_then_the_queued_calls_complete(
    llm_stack: Callable[..., LLMStack],
) -> None:
    stack = llm_stack(workers=2)
    stack.stub.configure(busy_for_s=1.0, retry_after_s=3, latency_s=0.1)
    calls = [stack.call() for _ in range(10)]
    values = [r.get(timeout=60) for r in calls]
    log = stack.stub.stats()["log"]

    busy = [entry["at"] for entry in log if entry["status"] == 429]
    first = min(busy)
    # After the first 429 only the other worker process may still reach the upstream, once:
    # with a request already on its way, or admitted before it saw the pause; its answer
    # (a 429 too) pauses it as well. Counted, not timed: on a loaded machine that request
    # may arrive any time during the pause.
    during = [e for e in log if first < e["at"] < first + 3.0 - 0.05]
    served = sorted(e["at"] for e in log if e["status"] == 200)
    print(f"\n429 cooldown: {len(busy)} answered 429 within {max(busy) - first:.3f}s, "
          f"{len(during)} requests during the 3 s pause, first served "
          f"{served[0] - first:.2f}s after the first 429, last {served[-1] - first:.2f}s")
    assert len(during) <= 2 - 1, during
    assert all(outcome(r) == "result" and v["source"] == "llm"
               for r, v in zip(calls, values, strict=True))
    assert len(served) == 10 and served[0] >= first + 3.0 - 0.05


def test_calls_whose_deadline_ends_inside_the_cooldown_fall_back(
    llm_stack: Callable[..., LLMStack],
) -> None:
    stack = llm_stack(max_delay="2s")
    stack.stub.configure(busy_for_s=30, retry_after_s=4)
    calls = [stack.call() for _ in range(5)]
    values = [r.get(timeout=30) for r in calls]
    reasons = {fallback_reason(r) for r in calls}
    print(f"\ncooldown past the deadline: reasons {reasons}, "
          f"{stack.stub.stats()['requests']} requests reached the stub")
    assert all(outcome(r) == "fallback" for r in calls)
    assert all(v == stack.config.tool("chat_completion").fallback for v in values)
    assert reasons <= {"cooldown", "deadline"}
    assert stack.stub.stats()["requests"] == 1


# --- 4. 5xx and timeouts: bounded retries with backoff ---------------------------------------


def test_5xx_answers_are_retried_with_backoff_up_to_the_bound_then_fail_clearly(
    llm_stack: Callable[..., LLMStack],
) -> None:
    stack = llm_stack(env={"THROTTLE_LLM_MAX_RETRIES": "2", "THROTTLE_LLM_BACKOFF_S": "0.3"})
    stack.stub.configure(fail_next=2, fail_status=502)
    recovered = stack.call().get(timeout=30)
    log = stack.stub.stats()["log"]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(log)]
    assert [e["status"] for e in log] == [502, 502, 200] and recovered["source"] == "llm"

    stack.stub.configure(fail_for_s=60, fail_status=500)
    error = failure_of(stack.call())
    statuses = [e["status"] for e in stack.stub.stats()["log"]]
    print(f"\n5xx: recovered after gaps {[f'{g:.2f}s' for g in gaps]}; then {error}")
    assert type(error).__name__ == "UpstreamError"
    assert "answered 500" in str(error) and "3 attempt(s)" in str(error)
    assert "THROTTLE_LLM_BASE_URL" in str(error)
    assert statuses == [502, 502, 200, 500, 500, 500]
    assert gaps[0] >= 0.3 * 0.5 and gaps[1] >= 0.6 * 0.5  # base x 2^n, jitter 0.5 to 1.5


def test_timeouts_are_retried_up_to_the_bound_then_fail_and_the_client_recovers(
    llm_stack: Callable[..., LLMStack],
) -> None:
    stack = llm_stack(env={"THROTTLE_LLM_MAX_RETRIES": "1", "THROTTLE_LLM_READ_TIMEOUT_S": "0.5"})
    stack.stub.configure(latency_s=2.0)
    started = time.monotonic()
    error = failure_of(stack.call())
    took = time.monotonic() - started
    stack.stub.configure(latency_s=0.0)
    time.sleep(2.0)  # let the stub finish the answers nobody waits for
    arrivals = [e["at"] for e in stack.stub.stats()["log"]]
    print(f"\ntimeout: failed after {took:.2f}s, {len(arrivals)} attempts: {error}")
    assert type(error).__name__ == "UpstreamError"
    assert "timed out" in str(error) and "read timeout 0.5s" in str(error)
    assert "2 attempt(s)" in str(error) and "THROTTLE_LLM_READ_TIMEOUT_S" in str(error)
    assert len(arrivals) == 2
    assert stack.call().get(timeout=30)["source"] == "llm"


# --- 5. the API key never leaks -------------------------------------------------------------


def test_the_api_key_is_found_nowhere_in_results_errors_logs_flower_or_redis(
    llm_stack: Callable[..., LLMStack], redis_dbs: tuple[str, str], redis_client: redis.Redis,
    prefix: str, tmp_path: Path,
) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    stack = llm_stack(level="DEBUG", env={"THROTTLE_LLM_API_KEY": canary,
                                          "THROTTLE_LLM_MAX_RETRIES": "0"})
    # Flower, watching the workers' task events (on by default in the `workers` app).
    port, login = free_port(), ("ops", f"pw-{uuid.uuid4().hex[:8]}")
    flower_env = {**stack.cluster.env, "THROTTLE_FLOWER_USER": login[0],
                  "THROTTLE_FLOWER_PASSWORD": login[1]}
    with server(throttle_cmd("flower", "--port", str(port)), tmp_path / "flower.log",
                f"http://127.0.0.1:{port}/healthcheck", env=flower_env, timeout_s=45):
        steps: list[tuple[dict[str, Any], int]] = [
            ({"api_key": canary}, 1),                                # served
            ({"answer": "bad_json"}, 1),                             # a bad answer
            ({"answer": "tool_call", "api_key": "another-key"}, 1),  # a 401 that echoes our key
            ({"api_key": canary, "busy_next": 1, "retry_after_s": 1}, 2),  # a 429, a cooldown
            ({"fail_for_s": 60}, 1),                                 # a 5xx, no retry left
        ]
        texts: list[str] = []
        for settings, count in steps:
            stack.stub.configure(**settings)
            for result in [stack.call() for _ in range(count)]:
                try:
                    texts.append(repr(result.get(timeout=30)))
                except Exception as exc:
                    texts += [str(exc), repr(exc), str(result.traceback)]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=login, timeout=10) as api:
            tasks = api.get("/api/tasks")
            flower_api = tasks.content + b"".join(
                api.get(f"/api/task/info/{task_id}").content for task_id in tasks.json()
            )
    stack.cluster.stop()
    sources = {
        "Flower's task API": flower_api,
        "Flower's log": (tmp_path / "flower.log").read_bytes(),
        "results and errors": "\n".join(texts).encode(),
        "worker logs": stack.cluster.logs().encode(),
        "result backend": b"\n".join(every_value(redis.Redis.from_url(redis_dbs[1]))),
        "broker": b"\n".join(every_value(redis.Redis.from_url(redis_dbs[0]))),
        "gate keys": b"\n".join(every_value(redis_client, f"{prefix}:*")),
    }
    stats = stack.stub.stats()
    print(f"\ncanary: {stats['authorized']} requests carried it, statuses {stats['statuses']}; "
          + ", ".join(f"{name} {len(data)} bytes" for name, data in sources.items()))
    assert stats["authorized"] >= 4 and stats["statuses"].get("401") == 1
    assert flower_api.count(b'"uuid"') >= 6  # Flower saw the calls
    assert "Incorrect API key provided: ***" in "\n".join(texts)  # the echo was redacted
    for name, data in sources.items():
        assert canary.encode() not in data, f"the API key leaked into the {name}"
