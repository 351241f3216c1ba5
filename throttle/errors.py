"""Every error throttle raises, under one root (args are kept picklable and JSON-safe).

The LLM tool's errors (`workers.tools.llm_http.LLMError` and its subclasses) and the demo's
`DemoError` live beside the code that raises them, under the same root.

    ThrottleError
    ├── ConfigError          the config is wrong: names the file, the tool and the field
    ├── StoreUnavailable     Redis could not be reached or answered with an error
    ├── Throttled            the call cannot run before its deadline; carries the fallback
    ├── InvalidToolCall      the arguments break the tool's parameter schema or size limit
    │                        (also a ValueError)
    ├── UpstreamBusy         raised by a tool body: the upstream asked for a pause (429/503)
    └── MissingExtra         a command needs an optional part: names the extra to install
"""

from __future__ import annotations

from typing import Any


class ThrottleError(Exception):
    """Root of every error raised by throttle."""


class ConfigError(ThrottleError):
    """The configuration is invalid; the message says where and what is expected."""


class StoreUnavailable(ThrottleError):
    """The gate's Redis could not be reached in time, or failed; wraps the cause."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message, url)
        self.url = url

    def __str__(self) -> str:
        return str(self.args[0])


class Throttled(ThrottleError):
    """The call's slot would lie past its deadline; `fallback` is the tool's fallback result."""

    def __init__(self, tool: str, reason: str, fallback: Any) -> None:
        super().__init__(tool, reason, fallback)
        self.tool = tool
        self.reason = reason
        self.fallback = fallback

    def __str__(self) -> str:
        return f"tool {self.tool!r} is throttled: {self.reason}"


class InvalidToolCall(ThrottleError, ValueError):
    """The call's arguments are invalid for the tool; never retried."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(tool, message)
        self.tool = tool
        self.message = message

    def __str__(self) -> str:
        return f"invalid call to tool {self.tool!r}: {self.message}"


class UpstreamBusy(ThrottleError):
    """Raise from a tool body when the upstream asks for a pause (429/503 with a retry hint).

    The worker pauses the tool (or its pool) for `retry_after_s` on every worker and sends
    the call back to wait out the pause, or to fall back if the pause outlasts its deadline.
    """

    def __init__(self, retry_after_s: float, message: str) -> None:
        super().__init__(retry_after_s, message)
        self.retry_after_s = retry_after_s
        self.message = message

    def __str__(self) -> str:
        return f"the upstream asked for a pause of {self.retry_after_s:g}s: {self.message}"


class MissingExtra(ThrottleError):
    """A command needs modules of an extra that is not installed; says which to install."""
