"""throttle: a distributed throttler for LLM tool calls on Celery and Redis."""

from throttle.config import Config, load_config
from throttle.errors import ConfigError, InvalidToolCall, StoreUnavailable, Throttled, ThrottleError
from throttle.gate import Action, AsyncGate, Decision, Gate

__all__ = [
    "Action",
    "AsyncGate",
    "Config",
    "ConfigError",
    "Decision",
    "Gate",
    "InvalidToolCall",
    "StoreUnavailable",
    "ThrottleError",
    "Throttled",
    "load_config",
]
