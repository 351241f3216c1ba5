"""`Throttle(app, config)`: one kombu Queue per tool, task_routes, safe defaults, `@tool`.

Create it after the app's own configuration: a setting the user changed from Celery's
default is kept; the others get the values throttle needs (JSON only, late acks with
redelivery on worker loss, prefetch 1, a visibility timeout above every max_delay).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from celery.app.defaults import DEFAULTS
from kombu import Queue  # type: ignore[attr-defined]

from throttle import reload as config_reload
from throttle.bootsteps import steps_for
from throttle.config import Config
from throttle.config_file import load_config
from throttle.errors import ConfigError
from throttle.gate import Gate
from throttle.keys import DEFAULT_PREFIX
from throttle.schema_check import SchemaCheck
from throttle.store import DEFAULT_REDIS_URL, StoreClient
from throttle.task import ThrottledTask

logger = logging.getLogger("throttle")

# Content types whose decoding runs code chosen by whoever can publish to a queue.
UNSAFE_CONTENT = ("pickle", "application/x-python-serialize")
ETA_TASK_LIMIT = 50_000
AMQP_MAX_PRIORITY = 9
REDIS_SCHEMES = ("redis", "rediss", "sentinel")
logger = logging.getLogger("throttle")

SAFE_DEFAULTS: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "worker_eta_task_limit": ETA_TASK_LIMIT,
    "broker_connection_retry_on_startup": True,
    # Survives a broker Redis dying mid-poll (see throttle/consumer.py).
    "worker_consumer": "throttle.consumer:Consumer",
    "task_publish_retry_policy": {
        "max_retries": 5, "interval_start": 0, "interval_step": 0.5, "interval_max": 2,
    },
}


class Throttle:
    """Per-tool queues and gated tasks for one Celery app."""

    def __init__(
        self,
        app: Celery,
        config: Config | str | Path,
        redis_url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        redis_client: StoreClient | None = None,
    ) -> None:
        self.app = app
        self.config = config if isinstance(config, Config) else load_config(config)
        self.redis_url = redis_url or os.environ.get("THROTTLE_REDIS_URL", DEFAULT_REDIS_URL)
        self.prefix = prefix
        self._redis_client = redis_client
        self._gate: Gate | None = None
        self._gate_pid = 0
        self._gate_connections: int | None = None  # the worker sizes it (see SizePools)
        # Bumped by a reload; shared with the pool processes forked later, which follow it.
        self._generation = multiprocessing.RawValue("i", 0)
        self._seen_generation = 0
        apply_defaults(app, self.config)
        # Only kombu's Redis transport can lose a message a consumer was handed (see
        # throttle/recovery.py); RabbitMQ requeues whatever a dead consumer left unacked.
        self.register_calls = _scheme(app) in REDIS_SCHEMES
        # RabbitMQ sets a message's redelivered flag itself; kombu's Redis transport keeps
        # it in the message, where any publisher can write it.
        self.trusts_redelivered = _is_amqp(app)
        self.priorities = delivery_priorities(app)
        declare_queues(app, self.config, amqp=_is_amqp(app))
        for step in steps_for(self):
            app.steps["worker"].add(step)

    @property
    def gate(self) -> Gate:
        """This process's gate, shared by its threads and greenlets (created lazily, and
        again after a fork). Two threads that make it at once each get a working gate."""
        if self._generation.value != self._seen_generation:
            self._follow_reload()
        if self._gate is None or self._gate_pid != os.getpid():
            client = self._redis_client or self.redis_url
            self._gate = Gate(client, self.config, prefix=self.prefix,
                              max_connections=self._gate_connections,
                              registers_calls=self.register_calls)
            self._gate_pid = os.getpid()
        return self._gate

    def flush_registrations(self) -> None:
        """Wait until the calls `.delay()` published from this process are registered for
        recovery (they are sent in the background; see throttle/registrar.py)."""
        self.gate.flush_registrations()

    def size_gate_pool(self, max_connections: int) -> None:
        """Bound the gate's connection pool (a call past it waits for a connection)."""
        self._gate_connections = max_connections
        self._gate = None  # made again, with the new size, on first use

    def reload(self) -> Config:
        """Load the tools file again and use it from the next call on (on SIGHUP).

        Raises ConfigError, keeping the running config, for a bad file, added or removed
        tools, or a max_delay the broker's visibility timeout no longer covers.
        """
        new = config_reload.reload_file(self.config)
        check_visibility(self.app, new)
        self._use(new)
        self._generation.value += 1
        self._seen_generation = self._generation.value
        return new

    def _follow_reload(self) -> None:
        """A pool process: load the file the main process reloaded (validating it again)."""
        self._seen_generation = self._generation.value
        try:
            new = config_reload.reload_file(self.config)
            check_visibility(self.app, new)
        except ConfigError as exc:
            logger.error("worker process %d: reload refused, the running config is kept: %s",
                         os.getpid(), exc)
            return
        self._use(new)

    def _use(self, new: Config) -> None:
        self.config = new
        self._gate = None
        for task in list(self.app.tasks.values()):
            if isinstance(task, ThrottledTask) and task.throttle is self:
                tool = new.tool(task.tool.name)
                cls = type(task)
                cls.tool = tool
                cls._schema = SchemaCheck(tool.params)

    def tool(self, name_or_fn: str | Callable[..., Any] | None = None, **options: Any) -> Any:
        """Decorate a plain function as the task of a configured tool.

        `@throttle.tool` uses the function's name; `@throttle.tool("search_products")` names
        the tool. Extra options go to `app.task` (`bind=True`, `autoretry_for`, `max_retries`,
        `time_limit`, `acks_late`, `ignore_result`, ...), except those throttle owns.
        """
        def register(fn: Callable[..., Any], name: str) -> Any:
            tool = self.config.tool(name)
            check_task_options(name, options)
            base = type(
                f"{name.title().replace('_', '')}Task",
                (ThrottledTask,),
                {
                    "throttle": self,
                    "tool": tool,
                    "_schema": SchemaCheck(tool.params),
                    "priority": self.priorities[0],
                    "priority_again": self.priorities[1],
                },
            )
            # Not shared: another app in the same process must not pick up this task.
            options.setdefault("shared", False)
            return self.app.task(fn, name=tool.queue, base=base, **options)

        if callable(name_or_fn):
            return register(name_or_fn, name_or_fn.__name__)
        return lambda fn: register(fn, name_or_fn or fn.__name__)


def check_task_options(tool: str, options: dict[str, Any]) -> None:
    """Refuse the Celery task options throttle sets itself, or that would fight its gate."""
    if options.get("rate_limit"):
        raise ConfigError(
            f"tool {tool!r}: Celery's rate_limit would throttle the tool a second time, "
            "per worker and inexactly; drop it and set the tool's `limits` in the config"
        )
    if options.get("serializer", "json") != "json":
        raise ConfigError(
            f"tool {tool!r}: serializer={options['serializer']!r} would be refused by the "
            "workers, which accept JSON only; drop the option"
        )
    for owned in ("name", "base", "queue"):
        if owned in options:
            raise ConfigError(
                f"tool {tool!r}: the task option {owned!r} is set by throttle (name and queue "
                "are tool.<name>, base is ThrottledTask); drop it"
            )


def apply_defaults(app: Celery, config: Config) -> None:
    """Set the settings throttle needs wherever the user kept Celery's default."""
    conf = app.conf
    if conf.task_default_rate_limit and not conf.worker_disable_rate_limits:
        logger.warning(
            "task_default_rate_limit=%r also applies to throttle's tools: each call is then "
            "limited twice, per worker and inexactly; set worker_disable_rate_limits=True or "
            "give the other tasks their own rate_limit", conf.task_default_rate_limit,
        )
    for key, value in SAFE_DEFAULTS.items():
        if key in DEFAULTS and conf.get(key) == DEFAULTS[key]:
            conf[key] = value
    _drop_unsafe_content(conf)
    longest_delay_s = max(tool.max_delay_ms for tool in config.tools.values()) / 1000
    visibility_s = config.visibility_timeout_ms / 1000
    for key in ("broker_transport_options", "result_backend_transport_options"):
        options = dict(conf.get(key) or {})
        options.setdefault("visibility_timeout", visibility_s)
        if options["visibility_timeout"] <= longest_delay_s:
            raise ConfigError(
                f"Celery setting {key}['visibility_timeout'] = {options['visibility_timeout']}s "
                f"is not above the longest max_delay ({longest_delay_s}s): delayed calls would "
                "be redelivered; raise it or lower max_delay"
            )
        if key == "broker_transport_options":
            if _is_amqp(app):
                options.setdefault("confirm_publish", True)
            else:
                # kombu sweeps for messages of lost workers only every ~100 s by default;
                # sweep every tenth of the visibility timeout (1-10 s) instead.
                options.setdefault("unacked_restore_interval", min(10, max(1, visibility_s // 10)))
                options.setdefault("unacked_restore_throttle", 1)
        conf[key] = options


def _drop_unsafe_content(conf: Any) -> None:
    """Take pickle out of `accept_content`: a tool's worker decodes JSON only."""
    accepted = list(conf.accept_content or [])
    unsafe = [name for name in accepted if name in UNSAFE_CONTENT]
    if unsafe:
        conf.accept_content = [name for name in accepted if name not in UNSAFE_CONTENT] or ["json"]
        logger.warning(
            "throttle: accept_content listed %s; removed it, so this app's workers accept %s "
            "(a pickled message runs code chosen by whoever can publish to a tool queue). "
            "Serve pickled tasks from a separate Celery app.", unsafe, conf.accept_content,
        )


def check_visibility(app: Celery, config: Config) -> None:
    """A ConfigError when a max_delay of `config` reaches the broker's visibility timeout."""
    longest_delay_s = max(tool.max_delay_ms for tool in config.tools.values()) / 1000
    visibility_s = (app.conf.broker_transport_options or {}).get("visibility_timeout")
    if visibility_s is not None and visibility_s <= longest_delay_s:
        raise ConfigError(f"{config.source}: the longest max_delay ({longest_delay_s}s) is not "
                          f"below the broker's visibility_timeout ({visibility_s}s)")


def _scheme(app: Celery) -> str:
    return str(app.conf.broker_url or "").split(":", 1)[0]


def _is_amqp(app: Celery) -> bool:
    return _scheme(app) in ("amqp", "pyamqp", "amqps")


def delivery_priorities(app: Celery) -> tuple[int | None, int | None]:
    """Message priorities (first delivery, re-published delay) for the app's broker.

    A delayed call coming back for its slot must not wait behind the backlog of calls
    that have not met the gate yet, so re-published calls go first. Redis polls priority
    0 first; RabbitMQ serves higher numbers first (queues get x-max-priority).
    """
    if _scheme(app) in REDIS_SCHEMES:
        return 9, 0
    if _is_amqp(app):
        return 0, AMQP_MAX_PRIORITY
    return None, None


def declare_queues(app: Celery, config: Config, *, amqp: bool = False) -> None:
    """One durable queue `tool.<name>` per tool, and a route for each tool's task."""
    conf = app.conf
    default = Queue(conf.task_default_queue)  # type: ignore[no-untyped-call]
    queues = list(conf.task_queues or [default])
    known = {queue.name for queue in queues}
    queues += [
        Queue(  # type: ignore[no-untyped-call]
            tool.queue, routing_key=tool.queue, max_priority=AMQP_MAX_PRIORITY if amqp else None
        )
        for tool in config.tools.values()
        if tool.queue not in known
    ]
    conf.task_queues = queues
    routes = {tool.queue: {"queue": tool.queue} for tool in config.tools.values()}
    existing = conf.task_routes
    if existing is None:
        conf.task_routes = routes
    elif isinstance(existing, dict):
        conf.task_routes = {**routes, **existing}
    else:
        conf.task_routes = (*existing, routes)
