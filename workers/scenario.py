"""The seed's scenario: assistant sessions firing bursts of e-commerce tool calls.

Each session takes several turns; a turn fires its tool calls together, the way an LLM asks
for several tools at once. Per session: about 47 catalog searches, 12 stock checks, 5 order
lookups, and a refund in about one session in five — several times the configured limits.
With the LLM tool in the config, every other turn also asks the model (`chat_completion`)
which search to run next, with the session's browsing so far in the prompt: a few thousand
tokens a call, over twice the tokens-per-minute pool at the demo's peak.

`throttle demo` and `python -m workers.produce` both send this plan (the demo drives this
module by name; see throttle/demo/seed.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEMO_TOOLS = ("search_products", "get_inventory", "lookup_order", "process_refund")
LLM_TOOL = "chat_completion"
LLM_MAX_TOKENS = 96
LLM_EVERY_TURNS = 2  # a model call every other turn: fewer, longer prompts
SEEN_LINES = (160, 400)  # products of the session's browsing in a prompt (~17 tokens each)
LLM_SYSTEM = ("You are a shopping assistant for an online store. Answer by calling "
              "search_products with the next search that helps the customer.")
SEARCH_FUNCTION = {
    "type": "function",
    "function": {
        "name": "search_products",
        "description": "Search the product catalog by keywords, optionally within one category",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["query"],
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 200},
                "category": {"enum": ["electronics", "kitchen", "outdoor", "office", "home"]},
                "max_results": {"type": "integer", "minimum": 1, "maximum": 20},
            },
        },
    },
}
SEARCHES = (40, 54)
STOCK_CHECKS = (9, 15)
ORDER_LOOKUPS = (3, 7)
REFUND_SHARE = 0.2
TURNS = (6, 10)
TURN_SPREAD_S = 0.05
QUERIES = (
    "headphones", "usb cable", "coffee grinder", "desk lamp", "hiking backpack", "kettle",
    "ergonomic chair", "monitor", "keyboard", "tent", "pillow", "cast-iron", "notebook",
    "air purifier", "knife", "mouse", "blanket", "laptop", "camping", "bamboo",
)
CATEGORIES = (None, None, None, "electronics", "kitchen", "outdoor", "office", "home")
REASONS = ("arrived damaged", "wrong size", "late delivery", "changed my mind")


@dataclass(frozen=True, slots=True)
class PlannedCall:
    """One tool call of one session, `at_s` seconds after the demo starts."""

    at_s: float
    session_id: str
    tool: str
    kwargs: Mapping[str, Any]


RUNAWAY_SESSION = "session-000"


def plan_sessions(
    sessions: int, duration_s: float, tools: Iterable[str], *, seed: int = 7, runaway: int = 0
) -> list[PlannedCall]:
    """Every call of the run, in firing order.

    Sessions start over the first third of the duration and each lasts half of it, so the
    last calls go out by five sixths and the rest of the run drains the delayed ones. With
    `chat_completion` among `tools`, every other turn starts with a model call. `runaway`:
    the first session behaves like a runaway agent looping on searches: that many more, fired
    evenly over its session from when it starts.
    """
    rng, llm_rng = random.Random(seed), random.Random(f"{seed}-llm")  # the same e-commerce plan
    start_span_s, session_s = duration_s / 3, duration_s / 2
    offered = set(tools)
    wanted = [tool for tool in DEMO_TOOLS if tool in offered]
    calls: list[PlannedCall] = []
    for number in range(sessions):
        session_id = f"session-{number:03d}"
        start_s = rng.uniform(0, start_span_s)
        later = rng.randint(*TURNS) - 1
        turns = [start_s] + [start_s + rng.uniform(0, session_s) for _ in range(later)]
        for tool in wanted:
            for _ in range(_calls_of(rng, tool)):
                at_s = rng.choice(turns) + rng.uniform(0, TURN_SPREAD_S)
                calls.append(PlannedCall(at_s, session_id, tool, _arguments(rng, tool, session_id)))
        if session_id == RUNAWAY_SESSION and "search_products" in offered:
            calls += [PlannedCall(start_s + index * session_s / runaway, session_id,
                                  "search_products", _arguments(rng, "search_products",
                                                                session_id))
                      for index in range(runaway)]
        if LLM_TOOL in offered:
            for turn, at_s in enumerate(sorted(turns)[::LLM_EVERY_TURNS]):
                arguments = _llm_arguments(llm_rng, session_id, turn)
                calls.append(PlannedCall(at_s, session_id, LLM_TOOL, arguments))
    calls.sort(key=lambda call: call.at_s)
    return calls


def _calls_of(rng: random.Random, tool: str) -> int:
    if tool == "search_products":
        return rng.randint(*SEARCHES)
    if tool == "get_inventory":
        return rng.randint(*STOCK_CHECKS)
    if tool == "lookup_order":
        return rng.randint(*ORDER_LOOKUPS)
    return 1 if rng.random() < REFUND_SHARE else 0


def _arguments(rng: random.Random, tool: str, session_id: str) -> dict[str, Any]:
    order_id = f"ORD-{rng.randint(50001, 50030)}"
    if tool == "search_products":
        category = rng.choice(CATEGORIES)
        extra = {} if category is None else {"category": category}
        return {"query": rng.choice(QUERIES), "session_id": session_id, **extra}
    if tool == "get_inventory":
        return {"sku": f"SKU-{rng.randint(1001, 1040)}", "session_id": session_id}
    if tool == "lookup_order":
        return {"order_id": order_id, "session_id": session_id}
    return {
        "order_id": order_id, "amount_cents": rng.randint(500, 5000),
        "reason": rng.choice(REASONS), "session_id": session_id,
    }


def _llm_arguments(rng: random.Random, session_id: str, turn: int) -> dict[str, Any]:
    """A model call: the session's browsing so far, and the next search to ask."""
    seen = "\n".join(
        f"- SKU-{rng.randint(1001, 1040)} {rng.choice(QUERIES)}"
        f" ({rng.choice(CATEGORIES[3:])}), {rng.randint(500, 30000)} cents,"
        f" rated {rng.randint(20, 50) / 10:g}, viewed {rng.randint(1, 9)} min ago"
        for _ in range(rng.randint(*SEEN_LINES))
    )
    ask = (f"Question {turn + 1}. I am looking for a {rng.choice(QUERIES)}"
           f" for {rng.choice(('home', 'work', 'a gift', 'travel'))}. What should I search next?")
    return {
        "messages": [
            {"role": "system", "content": LLM_SYSTEM},
            {"role": "user", "content": f"Products I viewed so far:\n{seen}\n\n{ask}"},
        ],
        "tools": [SEARCH_FUNCTION],
        "tool_choice": "search_products",
        "max_tokens": LLM_MAX_TOKENS,
        "session_id": session_id,
    }
