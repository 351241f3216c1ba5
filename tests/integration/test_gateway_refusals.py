"""What a careless or hostile caller sends the gateway: answered with the right status.

Against the real `throttle gateway` (and, where a call must run, real workers and the stub
upstream), as in test_gateway.py: numbers JSON cannot hold and bodies nested past any need
are 400s, not 500s; a call that no window can ever hold is a 400 without Retry-After (which
OpenAI clients would obey forever); and limits key on the tenant the API key proves, never
on the identity the body claims.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.integration import test_gateway
from tests.integration.test_gateway import CONFIG, Stack, error_of, function, weather_call
from throttle.keys import keys_for

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

stub = test_gateway.stub
gateway_stack = test_gateway.gateway_stack


def test_numbers_json_cannot_hold_and_bodies_nested_too_deep_get_a_400_not_a_500(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack(workers=0)
    url = f"{stack.gateway.url}/chat/completions"
    good = json.dumps(weather_call())
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(40):  # a tool's parameters, 80 levels of objects deep
        schema = {"type": "object", "properties": {"x": schema}}
    nested = weather_call(tools=[function("get_weather", schema)])
    cases = {
        "NaN": (good.replace('"max_tokens": 64', '"max_tokens": 64, "temperature": NaN'),
                "invalid_json"),
        "Infinity": (good.replace('"max_tokens": 64', '"temperature": -Infinity'),
                     "invalid_json"),
        "1e999": (good.replace('"max_tokens": 64', '"temperature": 1e999'), "invalid_json"),
        "100k deep": ("[" * 100_000 + "]" * 100_000, "too_deep"),
        "900 deep": ('{"messages": ' + "[" * 900 + "]" * 900 + "}", "too_deep"),
        "deep tool schema": (json.dumps(nested), "too_deep"),
    }
    for name, (content, code) in cases.items():
        response = httpx.post(url, content=content.encode(), timeout=30,
                              headers={"content-type": "application/json"})
        body = response.json()
        assert response.status_code == 400, (name, body)
        assert body["error"]["code"] == code, (name, body)
        assert body["error"]["type"] == "invalid_request_error", name
    print("\nrefused: " + "; ".join(
        f"{name}: {httpx.post(url, content=content.encode()).json()['error']['message'][:90]}"
        for name, (content, _) in list(cases.items())[::3]))
    assert httpx.get(f"{stack.gateway.root}/healthz", timeout=10).status_code == 200
    assert "Traceback" not in stack.gateway.text()


def test_a_call_costing_more_than_its_limit_is_a_400_without_retry_after(
    gateway_stack: Callable[..., Stack],
) -> None:
    stack = gateway_stack(weather_limits=("1000/60s",),
                          weather_extra={"cost": "workers.tools.llm:estimate_tokens"})
    client = openai.OpenAI(base_url=stack.gateway.url, api_key="k", max_retries=3, timeout=60)
    raw = client.chat.completions.with_raw_response
    error = error_of(lambda: raw.create(**weather_call(max_tokens=5000)))  # > 1000 alone
    print(f"\ncost over the limit: {error.status_code} {error.message!r}")
    assert isinstance(error, openai.BadRequestError)
    assert error.body["code"] == "cost_exceeds_limit"
    assert "retry-after" not in error.response.headers
    assert error.response.headers["x-throttle-fallback-reason"] == "cost_exceeds_limit"
    assert error.response.json()["fallback"] == stack.config.tool("get_weather").fallback
    assert raw.create(**weather_call(max_tokens=64)).headers["x-throttle-outcome"] == "result"
    assert stack.stub.stats()["statuses"] == {"200": 1}  # the first never reached the model


def test_limits_key_on_the_tenant_the_api_key_proves_not_on_the_user_the_body_claims(
    gateway_stack: Callable[..., Stack], redis_client: redis.Redis, prefix: str,
) -> None:
    params = tomllib.loads(CONFIG.read_text(encoding="utf-8"))[
        "tools"]["chat_completion"]["params"]
    params["required"] = [*params["required"], "tenant"]
    stack = gateway_stack(
        weather_limits=("1/60s",), weather_delay="1s",
        weather_extra={"key": "tenant", "params": params},
        gateway_env={"THROTTLE_GATEWAY_KEYS": "acme:key-a1,acme:key-a2,globex:key-g"},
    )
    outcomes = {}
    for name, key, user in (("acme alice", "key-a1", "alice"),
                            ("acme bob, other key", "key-a2", "bob"),
                            ("acme, no user", "key-a1", None),
                            ("globex alice", "key-g", "alice")):
        client = stack.client(key)
        try:
            extra: dict[str, Any] = {} if user is None else {"user": user}
            answer = client.chat.completions.with_raw_response.create(**weather_call(**extra))
            outcomes[name] = answer.status_code
        except openai.APIStatusError as exc:
            outcomes[name] = exc.status_code
    print(f"\ntenants at 1/60s: {outcomes}")
    assert outcomes == {"acme alice": 200, "acme bob, other key": 429, "acme, no user": 429,
                        "globex alice": 200}
    tool = stack.config.tool("get_weather")
    for tenant in ("acme", "globex"):
        assert redis_client.zcard(keys_for(prefix, tool, tenant).log) == 1, tenant
    spoofed = error_of(lambda: stack.client("alice").chat.completions.create(**weather_call()))
    assert spoofed.status_code == 401
