"""Token estimates for OpenAI-compatible chat requests, without a tokenizer.

About four characters make a token for the common BPE tokenizers on English and JSON. A
prompt is counted as its messages and tool definitions in compact JSON, so the role names,
quotes and schema keywords count too. The estimate is charged before a call and settled
from the upstream's `usage` afterwards: it has to be close, not exact. Nothing is downloaded.
The LLM tool (cost) and the stub upstream (its `usage`) use these same functions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

CHARS_PER_TOKEN = 4


def text_tokens(text: str) -> int:
    """Tokens in `text`: its characters / 4, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def compact_json(value: Any) -> str:
    """`value` as compact JSON, the form every estimate counts."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def prompt_tokens(messages: Sequence[Any], tools: Sequence[Any] | None = None) -> int:
    """Tokens of a chat prompt: the messages and the tool definitions (their JSON schemas)."""
    total = text_tokens(compact_json(list(messages)))
    if tools:
        total += text_tokens(compact_json(list(tools)))
    return total
