"""The OpenAI-compatible gateway, called with the official `openai` client.

Everything is real: `throttle gateway` and `throttle stub-llm` run in their own processes on
127.0.0.1, `celery worker` processes of the deployable `workers` app serve the tools (the
LLM body under `chat_completion` and under `get_weather`, a chat tool with its own limits),
and the gate, broker and result backend are the real Redis.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import tomli_w
from jsonschema import Draft202012Validator

from tests.support.gateway import CommandServer, StubServer, every_value
from tests.support.workers import Cluster
from throttle import Config, load_config
from throttle.keys import tool_keys
from throttle.tokens import prompt_tokens
from throttle.windows import most_in_window

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "tools.toml"
WEATHER_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["city", "unit", "days"],
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
}


def function(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": f"the {name} tool", "parameters": schema or WEATHER_SCHEMA}}


def forcing(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


MESSAGES = [{"role": "system", "content": "You call tools."},
            {"role": "user", "content": "What will the weather be in Lyon this week?"}]


def weather_call(**changes: Any) -> dict[str, Any]:
    """The keyword arguments of a chat.completions.create forcing get_weather."""
    return {"model": "stub-1", "messages": MESSAGES, "tools": [function("get_weather")],
            "tool_choice": forcing("get_weather"), "max_tokens": 64, **changes}


@dataclass
class Stack:
    """The gateway, its workers and the stub upstream of one test."""

    gateway: CommandServer
    stub: StubServer
    cluster: Cluster
    config: Config

    def client(self, key: str = "caller-key") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url, api_key=key, max_retries=0, timeout=60)

    def async_client(self, key: str = "caller-key") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gateway.url, api_key=key, max_retries=0,
                                  timeout=60)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[StubServer]:
    server = StubServer(tmp_path / "stub.out", "--latency", "0.05", "--api-key", "worker-key")
    yield server
    server.stop()


@pytest.fixture
def gateway_stack(
    make_cluster: Callable[..., Cluster], tmp_path: Path, stub: StubServer,
) -> Iterator[Callable[..., Stack]]:
    """Call to start workers (0 for none) and the gateway; `weather_limits` and
    `weather_delay` set the get_weather tool's limits and max_delay, `weather_extra` any
    other of its fields."""
    gateways: list[CommandServer] = []

    def start(
        *, workers: int = 1, weather_limits: tuple[str, ...] = ("1000/1s",),
        weather_delay: str = "30s", level: str = "INFO", gateway_args: tuple[str, ...] = (),
        gateway_env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None,
        weather_extra: dict[str, Any] | None = None,
    ) -> Stack:
        document = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
        document["pools"]["llm_tokens"]["limits"] = ["10000000/60s"]
        chat = document["tools"]["chat_completion"]
        chat.update(limits=["10000000/60s"], max_delay="30s")
        weather = copy.deepcopy(chat)
        for name in ("cost", "settle", "pool", "priority"):  # requests, not tokens
            weather.pop(name, None)
        weather.update(description="Calls that force get_weather", limits=list(weather_limits),
                       max_delay=weather_delay, **(weather_extra or {}))
        document["tools"]["get_weather"] = weather
        path = tmp_path / "tools.toml"
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        cluster = make_cluster({"tools": {"chat_completion": {}}}, env={
            "THROTTLE_CONFIG": str(path), "THROTTLE_LLM_BASE_URL": stub.url,
            "THROTTLE_LLM_API_KEY": "worker-key", "THROTTLE_LLM_BACKOFF_S": "0.1",
            "THROTTLE_LLM_MAX_RETRIES": "0", **(worker_env or {}),
        })
        for index in range(workers):
            log = (tmp_path / f"worker{index}.log").open("wb")
            cluster.procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
                 "tool.chat_completion,tool.get_weather", "-c", "2", "-n",
                 f"gw{index}-{uuid.uuid4().hex[:6]}@%h", "-l", level, "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            ))
        gateway = CommandServer(
            tmp_path / "gateway.log", "gateway", "--log-level", level.lower(), *gateway_args,
            env={**cluster.env, **(gateway_env or {})},
        )
        gateways.append(gateway)
        cluster.wait_ready(timeout_s=60)
        return Stack(gateway, stub, cluster, load_config(path))

    yield start
    for gateway in gateways:
        gateway.stop()


def error_of(call: Callable[[], Any]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


# --- 1. a forced tool call, and which tool gates which request -----------------------------


def test_a_forced_tool_call_round_trips_as_an_openai_completion_gated_by_the_right_tool(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack()
    client = stack.client()
    raw = client.chat.completions.with_raw_response.create(**weather_call())
    answer = raw.parse()

    call = answer.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather"
    assert list(Draft202012Validator(WEATHER_SCHEMA).iter_errors(arguments)) == []
    assert answer.object == "chat.completion" and answer.model == "stub-1"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == prompt_tokens(MESSAGES, [function("get_weather")])
    assert raw.headers["x-throttle-tool"] == "get_weather"  # a configured chat tool
    assert raw.headers["x-throttle-outcome"] == "result"

    routes = {  # forced function -> the throttle tool that gated the request
        "lookup_city": "chat_completion",      # not configured: the default tool
        "search_products": "chat_completion",  # configured, but not a chat tool
    }
    for name, tool in routes.items():
        routed = client.chat.completions.with_raw_response.create(
            **weather_call(tools=[function(name)], tool_choice=forcing(name)))
        assert routed.headers["x-throttle-tool"] == tool, name
        assert routed.parse().choices[0].message.tool_calls[0].function.name == name
    unforced = client.chat.completions.with_raw_response.create(
        **weather_call(tool_choice="auto"))
    assert unforced.headers["x-throttle-tool"] == "chat_completion"

    unknown = error_of(lambda: client.chat.completions.create(
        **weather_call(tool_choice=forcing("get_news"))))
    invalid = error_of(lambda: client.chat.completions.create(**weather_call(messages=[])))
    several = error_of(lambda: client.chat.completions.create(
        **weather_call(tools=[function("a_tool"), function("b_tool")], tool_choice="auto")))
    for error, code, param in ((unknown, "unknown_tool", "tool_choice"),
                               (invalid, "invalid_tool_call", "messages"),
                               (several, "tool_choice_required", "tool_choice")):
        assert isinstance(error, openai.BadRequestError), error
        assert error.body["code"] == code and error.body["param"] == param
        assert set(error.body) == {"message", "type", "param", "code"}
    assert "'get_news', which is not one of the request's tools" in unknown.message
    print(f"\nround trip: {arguments}, usage {answer.usage.model_dump()}; 400s: "
          f"{unknown.message!r}, {invalid.message!r}")

    assert stack.stub.stats()["statuses"] == {"200": 4}
    health = httpx.get(f"{stack.gateway.root}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["checks"] == {
        "redis": "ok", "result_backend": "ok", "broker": "ok"}
    metrics = httpx.get(f"{stack.gateway.root}/metrics", timeout=10).text
    assert 'throttle_gateway_requests_total{status="200",tool="get_weather"} 1.0' in metrics
    assert 'throttle_gateway_requests_total{status="200",tool="chat_completion"} 3.0' in metrics
    assert 'throttle_gateway_request_duration_seconds_count{tool="get_weather"} 2.0' in metrics


# --- 2. a burst beyond the limit: smoothed, never over it -----------------------------------


class LogWatcher(threading.Thread):
    """Reads a tool's gate log every 50 ms (entries leave it a window after their slot)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        super().__init__(daemon=True)
        self.client, self.key = client, key
        self.seen: dict[bytes, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.poll()

    def poll(self) -> None:
        for member, score in self.client.zrange(self.key, 0, -1, withscores=True):
            self.seen[member] = score / 1000


def threads_of(pid: int) -> int:
    """How many threads process `pid` runs now (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:", 1)[1].split()[0])


async def burst(client: openai.AsyncOpenAI, count: int, **changes: Any) -> list[Any]:
    calls = [client.chat.completions.with_raw_response.create(**weather_call(**changes))
             for _ in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_a_burst_beyond_the_limit_is_smoothed_and_every_request_completes(
    gateway_stack: Callable[..., Stack], redis_client: redis.Redis, prefix: str,
) -> None:
    limit, count = 4, 20
    stack = gateway_stack(weather_limits=(f"{limit}/1s",), weather_delay="30s")
    watcher = LogWatcher(redis_client, tool_keys(prefix, "get_weather").log)
    watcher.start()
    threads: list[int] = []

    async def sample_threads() -> None:
        while True:
            threads.append(threads_of(stack.gateway.proc.pid))
            await asyncio.sleep(0.1)

    async def burst_and_sample() -> list[Any]:
        sampler = asyncio.create_task(sample_threads())
        try:
            return await burst(stack.async_client(), count)
        finally:
            sampler.cancel()

    started = time.monotonic()
    answers = asyncio.run(burst_and_sample())
    elapsed = time.monotonic() - started
    watcher.done.set()
    watcher.join()
    watcher.poll()

    failures = [a for a in answers if isinstance(a, BaseException)]
    assert failures == []
    assert all(a.headers["x-throttle-outcome"] == "result" for a in answers)
    assert len(watcher.seen) == count
    admitted = most_in_window(list(watcher.seen.values()), 1.0)
    arrivals = [entry["at"] for entry in stack.stub.stats()["log"]]
    at_stub = most_in_window(arrivals, 0.75)  # arrivals lag admissions by a jittery few ms
    print(f"\nburst: {count} requests at {limit}/1s through the gateway in {elapsed:.2f}s, all "
          f"200; most admitted in any 1s window {admitted}, most reaching the stub in any "
          f"0.75s {at_stub}; the gateway ran at most {max(threads)} threads")
    assert admitted <= limit and at_stub <= limit
    assert max(threads) < count  # waiting requests hold no thread (8 publish threads + loop)
    assert len(arrivals) == count
    assert elapsed >= (count - limit) / limit * 0.9  # smoothed, not rejected


# --- 3. past the deadline: 429, Retry-After, the fallback -----------------------------------


def test_a_call_that_cannot_run_before_its_deadline_gets_a_429_with_retry_after_and_fallback(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack(weather_limits=("2/2s",), weather_delay="1s")
    answers = asyncio.run(burst(stack.async_client(), 6))
    served = [a for a in answers if not isinstance(a, BaseException)]
    refused = [a for a in answers if isinstance(a, BaseException)]
    assert len(served) == 2 and len(refused) == 4
    fallback = stack.config.tool("get_weather").fallback
    for error in refused:
        assert isinstance(error, openai.RateLimitError), error
        headers = error.response.headers
        assert 1 <= int(headers["retry-after"]) <= 2
        assert headers["x-throttle-fallback-reason"] == "deadline"
        body = error.response.json()
        assert body["fallback"] == fallback and body["error"]["code"] == "rate_limit_exceeded"
        assert "retry after" in body["error"]["message"]

    client = stack.client()
    now = error_of(lambda: client.chat.completions.create(
        **weather_call(), extra_headers={"X-Throttle-Max-Delay": "0"}))
    assert isinstance(now, openai.RateLimitError)
    retry_after_s = float(now.response.headers["retry-after"])
    time.sleep(retry_after_s)
    again = client.chat.completions.with_raw_response.create(**weather_call())
    print(f"\ndeadline: 2 served, 4 refused: {refused[0].message!r}; Retry-After "
          f"{retry_after_s:g}s, then served ({again.headers['x-throttle-outcome']})")
    assert again.headers["x-throttle-outcome"] == "result"
    metrics = httpx.get(f"{stack.gateway.root}/metrics", timeout=10).text
    assert 'throttle_gateway_fallbacks_total{reason="deadline",tool="get_weather"} 5.0' in metrics


# --- 4. the upstream's own errors, passed on --------------------------------------------------


def test_upstream_failures_reach_the_caller_with_their_status_and_message(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack()
    client = stack.client()
    request = weather_call(tools=[function("lookup_city")], tool_choice=forcing("lookup_city"))

    stack.stub.configure(api_key="another-key")
    refused = error_of(lambda: client.chat.completions.create(**request))
    stack.stub.configure(api_key="worker-key", fail_for_s=60, fail_status=502)
    failing = error_of(lambda: client.chat.completions.create(**request))
    stack.stub.configure(fail_for_s=0, answer="text")
    no_call = error_of(lambda: client.chat.completions.create(**request))
    stack.stub.configure(answer="tool_call")
    patterned = {"type": "object", "required": ["code"],
                 "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}
    bad_request = error_of(lambda: client.chat.completions.create(
        **weather_call(tools=[function("lookup_city", patterned)],
                       tool_choice=forcing("lookup_city"))))
    print(f"\nupstream: {refused.status_code} {refused.message!r}; {failing.status_code} "
          f"{failing.message!r}; {no_call.status_code}; {bad_request.status_code}")

    assert isinstance(refused, openai.AuthenticationError)
    assert "refused the request (401): Incorrect API key provided: ***" in refused.message
    assert isinstance(failing, openai.InternalServerError) and failing.status_code == 502
    assert "the last answered 502: The server had an error" in failing.message
    assert no_call.status_code == 502 and no_call.body["code"] == "invalid_model_answer"
    assert "did not call the forced tool 'lookup_city'" in no_call.message
    assert isinstance(bad_request, openai.BadRequestError)
    assert "refused the request (400): the stub cannot make arguments" in bad_request.message
    assert client.chat.completions.create(**request).choices[0].finish_reason == "tool_calls"


# --- 5. malformed and oversized requests -----------------------------------------------------


def test_malformed_json_and_oversized_bodies_get_400_and_413_in_the_openai_format(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack(workers=0, gateway_args=("--max-body-bytes", "4096"))
    url = f"{stack.gateway.url}/chat/completions"
    big = json.dumps(weather_call(messages=[{"role": "user", "content": "x" * 5000}])).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield from (big[i : i + 1000] for i in range(0, len(big), 1000))

    cases = {
        "not JSON": (httpx.post(url, content=b'{"model": "stub-1", "messages": ['), 400,
                     "invalid_json"),
        "empty": (httpx.post(url, content=b""), 400, "invalid_json"),
        "not an object": (httpx.post(url, json=[1, 2]), 400, "invalid_body"),
        "streaming": (httpx.post(url, json=weather_call(stream=True)), 400,
                      "unsupported_parameter"),
        "declared too large": (httpx.post(url, content=big), 413, "request_too_large"),
        "streamed too large": (httpx.post(url, content=chunked()), 413, "request_too_large"),
        "wrong method": (httpx.get(url), 405, None),
        "bad deadline": (httpx.post(url, json=weather_call(),
                                    headers={"X-Throttle-Max-Delay": "soon"}), 400,
                         "invalid_header"),
    }
    for name, (response, status, code) in cases.items():
        body = response.json()
        assert response.status_code == status, (name, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, name
        assert body["error"]["code"] == code, name
        assert body["error"]["type"] == "invalid_request_error", name
    print("\nrefused: " + "; ".join(f"{name}: {response.json()['error']['message']}"
                                     for name, (response, _, _) in cases.items()))
    too_large = openai.OpenAI(base_url=stack.gateway.url, api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        too_large.chat.completions.create(**weather_call(
            messages=[{"role": "user", "content": "x" * 5000}]))
    assert info.value.status_code == 413

    # Answers leave at once: with Nagle's algorithm on, each waited ~40 ms for a delayed ACK.
    # Compared with a bare loopback server answering in two writes with TCP_NODELAY, timed
    # alternately in the same test so both see the same load.
    with httpx.Client() as client, NoDelayServer() as baseline:
        took: dict[str, list[float]] = {"gateway": [], "baseline": []}
        for _ in range(11):
            for name, target in (("gateway", url), ("baseline", baseline.url)):
                began = time.perf_counter()
                client.post(target, content=b"{")
                took[name].append(time.perf_counter() - began)
    gateway_s, baseline_s = (sorted(took[name])[5] for name in ("gateway", "baseline"))
    print(f"\nmedian answer: gateway {gateway_s * 1000:.1f} ms, bare server "
          f"{baseline_s * 1000:.1f} ms")
    assert gateway_s < baseline_s + 0.020, "answers wait for a delayed ACK (Nagle)"


class NoDelayServer:
    """A loopback HTTP server that answers 400 in two writes (head, body) with TCP_NODELAY."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        body = b'{"error":{"message":"bad json"}}'
        with conn:
            buffer = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                if len(rest) < length:
                    continue
                buffer = rest[length:]
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body))
                conn.sendall(body)

    def __enter__(self) -> NoDelayServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.listener.close()


# --- 6. the caller's key goes nowhere ----------------------------------------------------------


def test_the_caller_s_key_is_found_in_no_task_result_log_or_redis_database(
    gateway_stack: Callable[..., Stack], redis_dbs: tuple[str, str], redis_client: redis.Redis,
    prefix: str,
) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    stack = gateway_stack(level="DEBUG", weather_limits=("1/10s",), weather_delay="1s",
                          gateway_env={"THROTTLE_GATEWAY_KEYS": f"other-key, {canary}"})
    client = stack.client(canary)
    texts: list[str] = []
    answer = client.chat.completions.create(  # served with the worker's own key
        **weather_call(tools=[function("lookup_city")], tool_choice=forcing("lookup_city")))
    texts.append(answer.model_dump_json())
    for request in (weather_call(), weather_call()):  # the second falls back: 429
        try:
            texts.append(client.chat.completions.create(**request).model_dump_json())
        except openai.APIStatusError as exc:
            texts.append(exc.response.text)
    stack.stub.configure(fail_next=1, fail_status=500)
    failed = error_of(lambda: client.chat.completions.create(**weather_call(
        tools=[function("lookup_city")], tool_choice=forcing("lookup_city"))))
    texts.append(failed.response.text)
    refused = error_of(lambda: stack.client(wrong).chat.completions.create(**weather_call()))
    missing = httpx.post(f"{stack.gateway.url}/chat/completions", json=weather_call())
    texts += [refused.response.text, missing.text]
    stack.gateway.stop()
    stack.cluster.stop()

    assert isinstance(refused, openai.AuthenticationError)
    assert refused.body["code"] == "invalid_api_key"
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert isinstance(failed, openai.InternalServerError)
    stats = stack.stub.stats()
    assert stats["authorized"] == 3 and stats["statuses"] == {"200": 2, "500": 1}
    sources = {
        "answers and errors": "\n".join(texts).encode(),
        "gateway log": stack.gateway.log.read_bytes(),
        "worker logs": stack.cluster.logs().encode(),
        "stub log": stack.stub.log.read_bytes(),
        "broker": b"\n".join(every_value(redis.Redis.from_url(redis_dbs[0]))),
        "result backend": b"\n".join(every_value(redis.Redis.from_url(redis_dbs[1]))),
        "gate keys": b"\n".join(every_value(redis_client, f"{prefix}:*")),
    }
    print(f"\ncanary: {stats['authorized']} upstream requests with the worker's key; "
          + ", ".join(f"{name} {len(data)} bytes" for name, data in sources.items()))
    assert b"POST /v1/chat/completions" in sources["gateway log"]  # the access log ran
    assert len(sources["result backend"]) > 0 and len(sources["gate keys"]) > 0
    for name, data in sources.items():
        assert canary.encode() not in data, f"the caller's key leaked into the {name}"
        assert wrong.encode() not in data, f"a refused key leaked into the {name}"
