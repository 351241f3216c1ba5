"""An OpenAI-compatible chat-completions stub, for tests and `docker compose` (no model).

`throttle stub-llm --port 8089` answers `POST /v1/chat/completions` with a call of the
forced tool whose arguments are the smallest values valid against its JSON Schema, with
`usage` counted like the LLM tool's estimate (characters / 4). It can add latency, answer
429 with Retry-After or fail with a 5xx on demand; `/_stub/config` changes that at run time
and `/_stub/stats` counts requests and tokens. See docs/llm.md.
"""

from __future__ import annotations

from throttle.stub.behaviour import Stub, StubSettings

# The HTTP server (`throttle.stub.server`: make_app, serve) needs tornado, from the `demo` extra.
__all__ = ["Stub", "StubSettings"]
