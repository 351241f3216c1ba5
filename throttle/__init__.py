"""throttle: a distributed throttler for LLM tool calls on Celery and Redis."""

from throttle.adaptive import report_headers
from throttle.async_gate import AsyncGate
from throttle.awaiting import wait
from throttle.config import Config
from throttle.config_file import load_config
from throttle.decision import Action, Decision
from throttle.errors import (
    ConfigError,
    InvalidToolCall,
    StoreUnavailable,
    Throttled,
    ThrottleError,
    UpstreamBusy,
)
from throttle.gate import Gate
from throttle.routing import Throttle
from throttle.task import ThrottledTask, fallback_reason, outcome

__all__ = [
    "Action",
    "AsyncGate",
    "Config",
    "ConfigError",
    "Decision",
    "Gate",
    "InvalidToolCall",
    "StoreUnavailable",
    "Throttle",
    "ThrottleError",
    "Throttled",
    "ThrottledTask",
    "UpstreamBusy",
    "fallback_reason",
    "load_config",
    "outcome",
    "report_headers",
    "wait",
]
