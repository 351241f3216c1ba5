"""Token estimates: what the LLM tool charges before a call and settles after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from throttle import load_config
from throttle.tokens import prompt_tokens, text_tokens
from workers.tools import llm

CONFIG = Path(__file__).resolve().parents[2] / "config" / "tools.toml"
TOOL = {"type": "function", "function": {"name": "answer", "parameters": {
    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}}


def test_text_counts_four_characters_per_token_rounded_up() -> None:
    assert [text_tokens("x" * n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_the_prompt_counts_its_messages_and_tool_schemas_as_compact_json() -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    alone = prompt_tokens(messages)
    assert alone == -(-len(json.dumps(messages, separators=(",", ":"))) // 4)
    with_tools = prompt_tokens(messages, [TOOL])
    assert with_tools - alone == -(-len(json.dumps([TOOL], separators=(",", ":"))) // 4)
    assert prompt_tokens([{"role": "user", "content": "é" * 40}]) < 20  # characters, not bytes


def test_the_charge_is_the_prompt_plus_max_tokens_and_grows_with_the_prompt() -> None:
    short = {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "max_tokens": 50}
    long = {**short, "messages": [{"role": "user", "content": "hi " * 400}]}
    assert llm.estimate_tokens(short) == prompt_tokens(short["messages"], [TOOL]) + 50
    assert llm.estimate_tokens(long) > llm.estimate_tokens(short) + 250
    default = {k: v for k, v in short.items() if k != "max_tokens"}
    assert llm.estimate_tokens(default) == prompt_tokens(short["messages"], [TOOL]) + 256


def test_the_settled_cost_is_the_upstream_s_total_tokens() -> None:
    result: dict[str, Any] = {"usage": {"prompt_tokens": 30, "completion_tokens": 7,
                                        "total_tokens": 37}}
    assert llm.used_tokens({}, result) == 37


def test_the_default_config_charges_and_settles_tokens_against_the_llm_pool() -> None:
    config = load_config(CONFIG)
    tool = config.tool("chat_completion")
    arguments = {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
                 "max_tokens": 10}
    assert tool.pool == "llm_tokens"
    assert tool.units(arguments) == llm.estimate_tokens(arguments)
    assert tool.settled_units(arguments, {"usage": {"total_tokens": 12}}) == 12
