"""The gateway's translation: which tool gates a request, its arguments, and error mapping."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from tests.support.servers import free_port
from throttle import Config, load_config
from throttle.errors import ConfigError
from throttle.gateway.callers import callers_from_env
from throttle.gateway.chat import completion, read_call
from throttle.gateway.command import _check_reachable
from throttle.gateway.errors import ApiError, failure_error
from throttle.gateway.service import Gateway
from throttle.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> Config:
    """The default tools file plus `get_weather`, a chat tool of its own."""
    document = tomllib.loads((ROOT / "config" / "tools.toml").read_text(encoding="utf-8"))
    weather = dict(document["tools"]["chat_completion"])
    for name in ("cost", "settle", "pool", "priority"):
        weather.pop(name)
    document["tools"]["get_weather"] = {**weather, "limits": ["5/1s"]}
    return load_config(document)


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def request(*names: str, choice: Any = None, **fields: Any) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [tool(name) for name in names], **fields}
    if choice is not None:
        body["tool_choice"] = choice
    return body


def forcing(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def test_a_forced_configured_chat_tool_gates_its_own_requests(config: Config) -> None:
    call = read_call(request("get_weather", choice=forcing("get_weather")), config,
                     "chat_completion")
    assert call.tool == "get_weather" and call.forced == "get_weather"
    assert call.kwargs["tool_choice"] == forcing("get_weather")


def test_other_forced_names_and_unforced_requests_go_through_the_default_tool(
    config: Config,
) -> None:
    for body in (request("lookup_city", choice=forcing("lookup_city")),
                 request("search_products", choice="search_products"),  # not a chat tool
                 request("get_weather", choice="auto"),
                 request("get_weather")):
        assert read_call(body, config, "chat_completion").tool == "chat_completion", body
    unforced = read_call(request("get_weather", choice="required"), config, "chat_completion")
    assert "tool_choice" not in unforced.kwargs  # the LLM tool forces the only tool


def test_only_the_forwarded_fields_become_the_task_s_arguments(config: Config) -> None:
    body = request("a", choice=forcing("a"), max_completion_tokens=9, temperature=0.5,
                   top_p=0.9, user="u-1", seed=3)
    kwargs = read_call(body, config, "chat_completion", "acme").kwargs
    assert sorted(kwargs) == ["max_tokens", "messages", "model", "session_id", "temperature",
                              "tenant", "tool_choice", "tools"]
    assert kwargs["max_tokens"] == 9
    assert (kwargs["session_id"], kwargs["tenant"]) == ("acme/u-1", "acme")  # from the key


@pytest.mark.parametrize(("body", "code", "param"), [
    ([1, 2], "invalid_body", None),
    (request("a", choice=forcing("b")), "unknown_tool", "tool_choice"),
    (request("a", "b", choice="auto"), "tool_choice_required", "tool_choice"),
    (request("a", choice="none"), "unsupported_parameter", "tool_choice"),
    (request("a", choice={"type": "allowed_tools"}), "invalid_tool_choice", "tool_choice"),
    (request("a", stream=True), "unsupported_parameter", "stream"),
    (request("a", n=2), "unsupported_parameter", "n"),
])
def test_requests_the_gateway_cannot_serve_get_a_400_saying_what_to_change(
    config: Config, body: Any, code: str, param: str | None,
) -> None:
    with pytest.raises(ApiError) as info:
        read_call(body, config, "chat_completion")
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_a_chat_tool_s_result_becomes_an_openai_completion() -> None:
    result = {"source": "llm", "tool": "get_weather", "arguments": {"city": "Lyon"},
              "model": "m-1", "finish_reason": "tool_calls",
              "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    answer = completion(result, task_id="a1b2-c3", created=1)
    call = answer["choices"][0]["message"]["tool_calls"][0]
    assert answer["id"] == "chatcmpl-a1b2c3" and answer["usage"] == result["usage"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Lyon"}'}
    with pytest.raises(ApiError) as info:
        completion({"results": []}, task_id="x", created=1)
    assert info.value.status == 502


def celery_failure(kind: str, *args: Any) -> dict[str, Any]:
    """A failure as Celery stores it with the JSON serializer."""
    return json.loads(json.dumps({"exc_type": kind, "exc_message": list(args),
                                  "exc_module": "workers.tools.llm_http"}))


@pytest.mark.parametrize(("failure", "status", "code"), [
    (celery_failure("UpstreamError", "the LLM upstream at http://u/v1 refused the request "
                    "(401): Incorrect API key provided: ***; check THROTTLE_LLM_API_KEY"),
     401, "upstream_error"),
    (celery_failure("UpstreamError", "the LLM upstream at http://u/v1 refused the request "
                    "(404): no such model; check the call's arguments and model"),
     404, "upstream_error"),
    (celery_failure("UpstreamError", "the LLM upstream at http://u/v1 failed all 3 "
                    "attempt(s); the last answered 503: overloaded. Check that it runs"),
     503, "upstream_error"),
    (celery_failure("UpstreamError", "the LLM upstream at http://u/v1 failed all 3 "
                    "attempt(s); the last timed out (ReadTimeout; read timeout 60s)"),
     504, "upstream_timeout"),
    (celery_failure("UpstreamError", "the LLM upstream at http://u/v1 failed all 1 "
                    "attempt(s); the last could not be reached (ConnectError: refused)"),
     502, "upstream_unavailable"),
    (celery_failure("UpstreamError", "the LLM upstream at http://u/v1 answered 429 "
                    "(insufficient quota): out of credit; check the account's plan"),
     429, "insufficient_quota"),
    (celery_failure("UpstreamError", "the LLM upstream answered 200 without a JSON object"),
     502, "upstream_unavailable"),
    (celery_failure("UpstreamError", "refused", 418), 418, "upstream_error"),
    (celery_failure("ModelAnswerError", "the model did not call the forced tool 'x'"),
     502, "invalid_model_answer"),
    (celery_failure("LLMError", "no model: pass model=... or set THROTTLE_LLM_MODEL"),
     400, "invalid_llm_call"),
    (celery_failure("InvalidToolCall", "chat_completion", "messages: [] should be non-empty"),
     400, "invalid_tool_call"),
    (celery_failure("ZeroDivisionError", "division by zero"), 500, "tool_failed"),
])
def test_a_failed_call_is_answered_with_the_upstream_s_status_and_message(
    failure: dict[str, Any], status: int, code: str,
) -> None:
    error = failure_error("chat_completion", failure)
    assert (error.status, error.code) == (status, code)
    # The message the worker raised (the last text argument: InvalidToolCall's first one
    # names the tool) reaches the caller, 400s included.
    said = next(arg for arg in reversed(failure["exc_message"]) if isinstance(arg, str))
    assert said in error.message


def test_the_settings_refuse_a_default_tool_that_does_not_take_chat_completions(
    config: Config,
) -> None:
    urls = {"redis_url": "redis://h/0", "broker_url": "redis://h/1",
            "result_backend": "redis://h/2"}
    with pytest.raises(ConfigError, match="does not take chat completions"):
        GatewaySettings(config=config, default_tool="search_products", **urls)
    with pytest.raises(ConfigError, match="is not a tool of"):
        GatewaySettings(config=config, default_tool="nope", **urls)
    with pytest.raises(ConfigError, match="is not Redis"):
        GatewaySettings(config=config, **{**urls, "result_backend": "rpc://"})
    settings = GatewaySettings(config=config, callers=callers_from_env(
        {"THROTTLE_GATEWAY_KEYS": " k-1 ,, k-2 "}), **urls)
    assert settings.callers.tenant_of("k-2") and not settings.callers.tenant_of("k-3")
    assert "k-1" not in repr(settings) and "k-1" not in str(settings.callers.tenants_by_digest)


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_the_gateway_refuses_to_start_when_the_gate_s_redis_does_not_answer(
    config: Config, scheme: str,
) -> None:
    port = free_port()
    settings = GatewaySettings(config=config, redis_url=f"{scheme}://127.0.0.1:{port}",
                               broker_url="memory://", result_backend=f"redis://127.0.0.1:{port}")
    with pytest.raises(click.ClickException, match=r"does not answer.*set THROTTLE_REDIS_URL"):
        _check_reachable(settings)


def test_direct_mode_refuses_a_body_that_is_not_an_importable_module_function(
    config: Config,
) -> None:
    urls = {"redis_url": "redis://127.0.0.1:1/0", "broker_url": "memory://",
            "result_backend": "redis://127.0.0.1:1/2"}
    with pytest.raises(ConfigError, match="--direct 'chat_completion' is not 'module:function'"):
        GatewaySettings(config=config, direct="chat_completion", **urls)
    with pytest.raises(ConfigError, match="--body-threads 0 must be at least 1"):
        GatewaySettings(config=config, direct="workers.tools.llm:chat_completion",
                        body_threads=0, **urls)
    settings = GatewaySettings(config=config, direct="workers.tools.nope:chat", **urls)
    with pytest.raises(ConfigError, match=r"--direct: cannot import function .*workers\.tools"):
        Gateway(settings)
