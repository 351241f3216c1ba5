"""The LLM tool as a throttled Celery task (body in `llm`, HTTP in `llm_http`).

It is served when the config declares `chat_completion`; a deployment without an LLM
leaves the tool (and its pool) out of its tools file.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init

from workers import throttle
from workers.tools import llm, llm_http

logger = logging.getLogger(__name__)

chat_completion = (
    throttle.tool(llm.chat_completion) if "chat_completion" in throttle.config.tools else None
)


def _open_client(**_: Any) -> None:
    """Make the process's HTTP client before its first call, not in it.

    A body should start right after its admission: building a client (TLS context and all)
    takes tens of milliseconds, which would push the first request of each process late.
    """
    try:
        llm_http.upstream()
    except llm_http.LLMError as exc:
        logger.error("LLM tool: %s", exc)


worker_process_init.connect(_open_client, weak=False)


__all__ = ["chat_completion"]
