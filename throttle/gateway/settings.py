"""What the gateway serves and where it reads: one frozen, checked object."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from throttle.config import Config
from throttle.errors import ConfigError
from throttle.gateway.callers import Callers
from throttle.keys import DEFAULT_PREFIX, check_prefix
from throttle.store import mask_url

DEFAULT_TOOL = "chat_completion"
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEFAULT_RUN_TIMEOUT_S = 180.0
DEFAULT_PUBLISH_THREADS = 8
DEFAULT_BODY_THREADS = 64
RESULT_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class GatewaySettings:
    """The tools file, the gate's Redis, the broker, the result backend and the limits.

    `direct` names the tool body ('module:function') the gateway runs itself in direct mode
    (None: calls go through the broker to the workers); `body_threads` run those bodies.
    `callers` holds the bearer tokens callers must send, each bound to a tenant (none:
    every caller is accepted, as tenant `local`); only their SHA-256 digests are kept.
    """

    config: Config
    redis_url: str
    broker_url: str
    result_backend: str
    prefix: str = DEFAULT_PREFIX
    default_tool: str = DEFAULT_TOOL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S
    publish_threads: int = DEFAULT_PUBLISH_THREADS
    sweep_s: float = 1.0
    callers: Callers = field(default_factory=Callers)
    direct: str | None = None  # 'module:function' of the body the gateway runs itself
    body_threads: int = DEFAULT_BODY_THREADS

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        tools = ", ".join(self.config.tools)
        tool = self.config.tools.get(self.default_tool)
        if tool is None:
            raise ConfigError(f"--default-tool {self.default_tool!r} is not a tool of "
                              f"{self.config.source}; use one of: {tools}")
        if not tool.takes_chat:
            raise ConfigError(f"--default-tool {self.default_tool!r} does not take chat "
                              "completions (its params declare no 'messages'); name the LLM "
                              "tool, e.g. chat_completion")
        scheme = urlsplit(self.result_backend).scheme
        if scheme not in RESULT_SCHEMES:
            raise ConfigError(f"the result backend {mask_url(self.result_backend)} is not "
                              "Redis: the gateway waits on Redis results; set "
                              "THROTTLE_RESULT_BACKEND (or --result-backend) to redis://...")
        if self.direct is not None and (":" not in self.direct or self.direct.startswith(":")):
            raise ConfigError(f"--direct {self.direct!r} is not 'module:function'; name the "
                              "tool's body, e.g. workers.tools.llm:chat_completion")
        if self.body_threads < 1:
            raise ConfigError(f"--body-threads {self.body_threads} must be at least 1")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes {self.max_body_bytes} is too small for any "
                              "chat request; use at least 1024")
