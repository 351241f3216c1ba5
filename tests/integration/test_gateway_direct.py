"""The gateway in direct mode: it gates each call itself and runs the LLM body, no worker.

The same stack as test_gateway.py (the real `throttle gateway` and `throttle stub-llm` in
their own processes, the real Redis), started with `--direct
workers.tools.llm:chat_completion` and no worker at all: a served call proves the gateway
ran the body, and the gate's windows, the upstream's pauses and what it reports of its
limits hold as on the workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest
import redis

from tests.integration import test_gateway
from tests.integration.test_gateway import (
    Stack,
    burst,
    error_of,
    forcing,
    function,
    weather_call,
)
from tests.support.relay import Relay
from throttle.adaptive import read_states
from throttle.keys import keys_for, tool_keys

pytestmark = [pytest.mark.redis, pytest.mark.slow]

stub = test_gateway.stub
gateway_stack = test_gateway.gateway_stack
DIRECT = ("--direct", "workers.tools.llm:chat_completion")


def test_direct_mode_serves_within_the_limit_and_answers_the_rest_with_429_and_fallback(
    gateway_stack: Callable[..., Stack], redis_client: redis.Redis, prefix: str,
    redis_dbs: tuple[str, str],
) -> None:
    stack = gateway_stack(workers=0, weather_limits=("2/2s",), weather_delay="1s",
                          gateway_args=DIRECT,
                          gateway_env={"THROTTLE_BROKER_URL": "redis://127.0.0.1:1/0"})
    health = httpx.get(f"{stack.gateway.root}/healthz", timeout=10).json()
    assert health["status"] == "ok" and "broker" not in health["checks"]  # none needed
    answers = asyncio.run(burst(stack.async_client(), 6))
    served = [a for a in answers if not isinstance(a, BaseException)]
    refused = [a for a in answers if isinstance(a, BaseException)]
    assert len(served) == 2 and len(refused) == 4, refused
    assert all(a.headers["x-throttle-outcome"] == "result" for a in served)
    assert served[0].parse().choices[0].message.tool_calls[0].function.name == "get_weather"
    fallback = stack.config.tool("get_weather").fallback
    for error in refused:
        assert isinstance(error, openai.RateLimitError), error
        assert error.response.headers["x-throttle-fallback-reason"] == "deadline"
        assert 1 <= int(error.response.headers["retry-after"]) <= 2
        assert error.response.json()["fallback"] == fallback
    assert len(stack.stub.stats()["log"]) == 2  # the refused calls never reached the upstream
    log = tool_keys(prefix, "get_weather").log  # each served call under its X-Throttle-Task-Id
    assert {m.decode() for m in redis_client.zrange(log, 0, -1)} == {
        a.headers["x-throttle-task-id"] for a in served}
    broker = redis.Redis.from_url(redis_dbs[0])
    assert list(broker.scan_iter(match="tool.*")) == []  # no broker was even reachable

    invalid = error_of(lambda: stack.client().chat.completions.create(
        **weather_call(messages=[])))
    assert isinstance(invalid, openai.BadRequestError)
    assert invalid.body["code"] == "invalid_tool_call" and invalid.body["param"] == "messages"


def test_direct_mode_waits_out_an_upstream_pause_or_falls_back_when_it_outlasts_the_deadline(
    gateway_stack: Callable[..., Stack], redis_client: redis.Redis, prefix: str,
) -> None:
    stack = gateway_stack(workers=0, weather_delay="3s", gateway_args=DIRECT,
                          worker_env={"THROTTLE_LLM_MAX_RETRIES": "0"})
    client = stack.client()
    stack.stub.configure(busy_next=1, retry_after_s=1)
    started = time.monotonic()
    answer = client.chat.completions.with_raw_response.create(**weather_call())
    waited_s = time.monotonic() - started
    assert answer.headers["x-throttle-outcome"] == "result"
    assert waited_s >= 0.9  # the pause, shared through the gate, then the call again
    assert len(stack.stub.stats()["log"]) == 2

    stack.stub.configure(busy_next=1, retry_after_s=30)
    paused = error_of(lambda: client.chat.completions.create(**weather_call()))
    assert isinstance(paused, openai.RateLimitError)
    assert paused.response.headers["x-throttle-fallback-reason"] == "cooldown"
    cooldown = tool_keys(prefix, "get_weather").cooldown
    assert redis_client.pttl(cooldown) > 20_000  # every gateway and worker now waits


def test_direct_mode_settles_a_token_charge_to_the_upstream_s_usage(
    gateway_stack: Callable[..., Stack], redis_client: redis.Redis, prefix: str,
) -> None:
    stack = gateway_stack(workers=0, gateway_args=DIRECT)
    answer = stack.client().chat.completions.create(  # not a chat tool: chat_completion gates
        **weather_call(tools=[function("lookup_city")], tool_choice=forcing("lookup_city")))
    assert answer.usage is not None
    tool = stack.config.tool("chat_completion")
    keys = keys_for(prefix, tool)
    assert keys.pool_cost is not None
    charged: dict[bytes, bytes] = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # settled just after the answer went out
        charged = redis_client.hgetall(keys.pool_cost)
        if [float(v) for v in charged.values()] == [answer.usage.total_tokens]:
            break
        time.sleep(0.05)
    assert [float(v) for v in charged.values()] == [answer.usage.total_tokens]


def test_direct_mode_answers_with_the_fallback_when_the_gate_s_redis_is_gone(
    gateway_stack: Callable[..., Stack], redis_url: str,
) -> None:
    parts = urlsplit(redis_url)
    with Relay(parts.hostname or "127.0.0.1", parts.port or 6379) as relay:
        gate_url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{relay.port}"))
        stack = gateway_stack(workers=0, gateway_args=DIRECT,
                              gateway_env={"THROTTLE_REDIS_URL": gate_url})
        client = stack.client()
        assert client.chat.completions.with_raw_response.create(
            **weather_call()).headers["x-throttle-outcome"] == "result"
        relay.refusing.set()
        relay.cut()
        refused = error_of(lambda: client.chat.completions.create(**weather_call()))
    assert isinstance(refused, openai.RateLimitError)  # on_store_error = "fallback"
    assert refused.response.headers["x-throttle-fallback-reason"] == "store_unavailable"
    assert refused.response.json()["fallback"] == stack.config.tool("get_weather").fallback
    assert len(stack.stub.stats()["log"]) == 1  # never called blind


def test_direct_mode_teaches_an_adaptive_tool_the_limit_the_upstream_reports(
    gateway_stack: Callable[..., Stack], redis_client: redis.Redis, prefix: str,
) -> None:
    stack = gateway_stack(workers=0, weather_limits=("1000/60s",), gateway_args=DIRECT,
                          weather_extra={"adaptive": True})
    stack.stub.configure(hidden_requests=600, hidden_window_s=60, limit_headers="openai")
    stack.client().chat.completions.create(**weather_call())
    [state] = read_states(redis_client, stack.config, prefix)
    assert (state.target, state.configured, state.effective) == ("tool get_weather", 1000, 600)
