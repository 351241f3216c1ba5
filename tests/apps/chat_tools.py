"""The deployable `workers` app, plus the LLM body under every other configured chat tool.

`celery -A tests.apps.chat_tools worker -Q tool.chat_completion,tool.get_weather` serves
`chat_completion` as `workers` does, and `get_weather` (a tool of the tools file whose
params declare `messages`) with the same body: the gateway routes requests forcing
`get_weather` to that tool's own queue and limits (docs/gateway.md, "Which tool").
"""

from __future__ import annotations

from throttle.gateway.chat import takes_chat
from workers import app, throttle
from workers.tools import llm

chat_tools = {
    name: throttle.tool(name)(llm.chat_completion)
    for name, tool in throttle.config.tools.items()
    if name != "chat_completion" and takes_chat(tool)
}

__all__ = ["app", "chat_tools"]
