"""What the gateway serves and where it reads: one frozen, checked object."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import InitVar, dataclass, field
from urllib.parse import urlsplit

from throttle.config import Config
from throttle.errors import ConfigError
from throttle.gateway.chat import takes_chat
from throttle.keys import DEFAULT_PREFIX, check_prefix
from throttle.store import mask_url

DEFAULT_TOOL = "chat_completion"
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEFAULT_RUN_TIMEOUT_S = 180.0
DEFAULT_PUBLISH_THREADS = 8
KEYS_VARIABLE = "THROTTLE_GATEWAY_KEYS"
RESULT_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class GatewaySettings:
    """The tools file, the gate's Redis, the broker, the result backend and the limits.

    `api_keys` are the bearer tokens callers must send (none: every caller is accepted);
    only their SHA-256 digests are kept (`key_digests`).
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
    api_keys: InitVar[tuple[str, ...]] = ()
    key_digests: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self, api_keys: tuple[str, ...]) -> None:
        check_prefix(self.prefix)
        tools = ", ".join(self.config.tools)
        tool = self.config.tools.get(self.default_tool)
        if tool is None:
            raise ConfigError(f"--default-tool {self.default_tool!r} is not a tool of "
                              f"{self.config.source}; use one of: {tools}")
        if not takes_chat(tool):
            raise ConfigError(f"--default-tool {self.default_tool!r} does not take chat "
                              "completions (its params declare no 'messages'); name the LLM "
                              "tool, e.g. chat_completion")
        scheme = urlsplit(self.result_backend).scheme
        if scheme not in RESULT_SCHEMES:
            raise ConfigError(f"the result backend {mask_url(self.result_backend)} is not "
                              "Redis: the gateway waits on Redis results; set "
                              "THROTTLE_RESULT_BACKEND (or --result-backend) to redis://...")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes {self.max_body_bytes} is too small for any "
                              "chat request; use at least 1024")
        object.__setattr__(self, "key_digests", tuple(_digest(key) for key in api_keys))

    def accepts(self, token: str) -> bool:
        """Whether `token` is one of the configured keys (compared in constant time)."""
        digest = _digest(token)
        return any(hmac.compare_digest(digest, known) for known in self.key_digests)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_from_env(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The callers' keys from THROTTLE_GATEWAY_KEYS (comma-separated; blanks ignored)."""
    raw = (environ if environ is not None else dict(os.environ)).get(KEYS_VARIABLE, "")
    return tuple(key.strip() for key in raw.split(",") if key.strip())
