"""The LLM tool as throttled Celery tasks (body in `llm`, HTTP in `llm_http`).

The body is served as `chat_completion` when the config declares it, and under every other
tool whose params take chat arguments (`messages`): the gateway sends requests forcing such
a tool to its own queue and limits (docs/gateway.md). A deployment without an LLM leaves
these tools (and their pool) out of its tools file.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init

from throttle import Throttle
from workers.tools import llm, llm_http

logger = logging.getLogger(__name__)


def register(throttle: Throttle) -> dict[str, Any]:
    """The LLM body as the task of `chat_completion` and of every chat tool the config has."""
    return {
        name: throttle.tool(name)(llm.chat_completion)
        for name, tool in throttle.config.tools.items()
        if name == "chat_completion" or tool.takes_chat
    }


def _open_client(**_: Any) -> None:
    """Make the process's HTTP client before its first call, not in it.

    A body should start right after its admission: building a client (TLS context and all)
    takes tens of milliseconds, which would push the first request of each process late.
    """
    try:
        llm_http.upstream()
    except llm_http.LLMError as exc:
        logger.error("LLM tool: %s", exc)


worker_process_init.connect(_open_client, weak=False)  # each prefork child
# threads, gevent, eventlet and solo run calls in the worker's main process, where
# worker_process_init is not sent: the first call of such a node made the client itself.
worker_init.connect(_open_client, weak=False)


__all__ = ["register"]
