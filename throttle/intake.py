"""What a tool's worker accepts from the broker, checked before anything else touches it.

Celery's consumer (the worker's main process) decodes each message and hands it to the
pool; prefork pickles it for a child, and a value nested a few hundred levels deep makes
that a RecursionError which stops the worker, then comes back with the message after every
restart. `guarded` is the strategy of every tool task: it checks the raw message first
(size, encoding, shape, nesting depth, header types, an ETA the broker would keep
redelivering) and answers a malformed one at once: the call's result becomes a FAILURE
carrying `InvalidToolCall` (never over a result the id already has), and the message is
acked. So no message, however it was made, reaches the
pool unchecked or comes back. The task then checks the arguments against the tool's schema.

The caller's side uses the same limits (`nested_deeper_than`, `schedule_problem`,
`reused_id_problem`), and the task reads throttle's own headers as claims
(`header_number`, `header_count`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from celery import states
from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

from throttle.errors import InvalidToolCall

logger = logging.getLogger("throttle")

MAX_ARGS_DEPTH = 32  # arrays and objects inside a call's arguments
POSITIONAL = ("pass arguments by keyword, e.g. .delay(query='...'); after a chain step, give "
              "the tool an immutable signature, .si(query='...')")
MAX_MESSAGE_DEPTH = 64  # the whole message: headers, arguments, callbacks
ENVELOPE_BYTES = 65_536  # a message may exceed max_args_bytes by this (headers, callbacks)
MAX_ID_CHARS = 255
# The most characters compact JSON (ASCII only) writes for one character or byte of a body:
# a character outside the BMP becomes two \u escapes (12); a number grows less ("1e15").
MAX_ENCODED_PER_CHAR = 12
# Celery's own headers a worker reads, and the types it expects of them.
_TEXT_HEADERS = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "eta",
                 "expires", "origin")


MAX_COUNT = 1_000  # delays and store retries a header may claim


def header_number(value: Any) -> float | None:
    """A header's value as a finite number, else None (headers are the caller's to write)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def header_count(value: Any) -> int:
    """A counter header's value, bounded to 0..MAX_COUNT (0 when it is not a number)."""
    number = header_number(value)
    return 0 if number is None else int(min(max(number, 0), MAX_COUNT))


def visibility_s(app: Any) -> float:
    """The broker's visibility timeout (s): an unacked message held longer comes back."""
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", 3600))


def eta_ahead_s(eta: Any) -> float:
    """Seconds from now until `eta` (a datetime or an ISO 8601 string; naive means UTC)."""
    when = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def too_far(ahead_s: float, limit_s: float) -> str | None:
    """The refusal of an ETA `ahead_s` from now, past the visibility timeout `limit_s`."""
    if ahead_s < limit_s:
        return None
    return (f"its ETA is {ahead_s:.0f} s ahead, not below the broker's visibility timeout "
            f"({limit_s:.0f} s): the broker would deliver it again and again; schedule it "
            "nearer or raise visibility_timeout")


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` holds arrays/objects (lists, tuples, dicts) more than `limit` deep.

    Iterative, so any depth is measured without recursion.
    """
    containers = (dict, list, tuple)
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, containers) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        depth += 1
        children: Iterable[Any] = item.values() if isinstance(item, dict) else item
        for child in children:  # (a loop, not a generator: every message passes here)
            if child.__class__ not in _SCALARS and isinstance(child, containers):
                stack.append((child, depth))
    return False


# JSON's scalars, exactly: most values of a message, passed over without isinstance.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def too_deep(limit: int = MAX_ARGS_DEPTH) -> str:
    """The refusal of arguments nested deeper than `limit`."""
    return (f"arguments nest arrays/objects more than {limit} levels deep; flatten them or "
            "send a reference to the data instead")


def schedule_problem(options: dict[str, Any], max_eta_s: float) -> str | None:
    """The refusal of an `apply_async` eta/countdown the broker would redeliver forever."""
    try:
        if options.get("eta") is not None:
            ahead_s = eta_ahead_s(options["eta"])
        elif options.get("countdown") is not None:
            ahead_s = float(options["countdown"])
        else:
            return None
    except (TypeError, ValueError) as exc:
        return f"eta/countdown unreadable: {exc}"
    return too_far(ahead_s, max_eta_s)


def reused_id_problem(backend: Any, task_id: Any) -> str | None:
    """The refusal of a caller's task id that is not a string or names a finished call."""
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID_CHARS:
        return f"task_id must be a string of 1-{MAX_ID_CHARS} characters, got {task_id!r:.40}"
    try:
        state = backend.get_state(task_id)
    except Exception:  # no result backend, or it cannot say: the worker still refuses
        return None
    if state in states.READY_STATES:
        return (f"task id {task_id!r} already names a finished call ({state}); give every "
                "call its own id, or leave task_id out")
    return None


def message_problem(
    headers: Any, body: bytes | str, decode: Callable[[], Any], max_args_bytes: int,
    max_eta_s: float = math.inf,
) -> str | None:
    """What is wrong with a tool's task message (None if nothing): never raises."""
    try:
        return (_header_problem(headers, max_eta_s)
                or _body_problem(headers, body, decode, max_args_bytes))
    except Exception as exc:  # a message odd enough to break a check is refused too
        return f"the message could not be checked ({type(exc).__name__}: {exc})"


def _header_problem(headers: Any, max_eta_s: float) -> str | None:
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID_CHARS:
        return f"the task id must be a string of 1-{MAX_ID_CHARS} characters, got {task_id!r:.80}"
    for name in _TEXT_HEADERS:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            return f"header {name!r} must be a string, got {type(headers[name]).__name__}"
    retries = headers.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        return f"header 'retries' must be a whole number >= 0, got {retries!r:.80}"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple) and len(limits) == 2
        and all(_limit_ok(limit) for limit in limits)
    ):
        return f"header 'timelimit' must be [hard, soft] seconds or nulls, got {limits!r:.80}"
    stamped = headers.get("stamped_headers")
    if stamped is not None and not (
        isinstance(stamped, list) and all(isinstance(name, str) for name in stamped)
    ):
        return f"header 'stamped_headers' must be a list of names, got {stamped!r:.80}"
    for name in ("ignore_result",):
        if headers.get(name) is not None and not isinstance(headers[name], bool):
            return f"header {name!r} must be true or false, got {headers[name]!r:.80}"
    if nested_deeper_than(headers, MAX_MESSAGE_DEPTH):
        return f"the headers nest more than {MAX_MESSAGE_DEPTH} levels deep"
    if headers.get("eta") is not None:
        try:
            ahead_s = eta_ahead_s(headers["eta"])
        except (TypeError, ValueError) as exc:
            return f"header 'eta' is not an ISO 8601 time ({exc})"
        return too_far(ahead_s, max_eta_s)
    return None


def _limit_ok(limit: Any) -> bool:
    if limit is None:
        return True
    return isinstance(limit, int | float) and not isinstance(limit, bool) and (
        math.isfinite(limit) and limit > 0
    )


def _body_problem(
    headers: Any, body: bytes | str, decode: Callable[[], Any], max_args_bytes: int
) -> str | None:
    size = len(body)
    if size > max_args_bytes + ENVELOPE_BYTES:
        return (f"the message is {size} bytes, far above the tool's max_args_bytes "
                f"({max_args_bytes}); send a reference instead of the data")
    try:
        payload = decode()
    except Exception as exc:  # DecodeError, ContentDisallowed, RecursionError in a parser
        return f"the message body could not be decoded ({type(exc).__name__}: {exc})"
    if isinstance(payload, dict) and "args" in payload and "kwargs" in payload:  # protocol 1
        args, kwargs, embed = payload["args"], payload["kwargs"], None
    elif isinstance(payload, list | tuple) and len(payload) == 3:
        args, kwargs, embed = payload
    else:
        return "the message body is not Celery's [args, kwargs, embed]"
    if not isinstance(args, list | tuple) or args:
        return POSITIONAL
    if not isinstance(kwargs, dict):
        return f"keyword arguments must be an object, got {type(kwargs).__name__}"
    if embed is not None and not isinstance(embed, dict):
        return f"the message's callbacks must be an object, got {type(embed).__name__}"
    if nested_deeper_than(kwargs, MAX_ARGS_DEPTH):
        return too_deep(MAX_ARGS_DEPTH)
    # Measured as the caller measures them; a body this small cannot hold more.
    size = 0 if len(body) * MAX_ENCODED_PER_CHAR <= max_args_bytes else len(
        json.dumps(kwargs, separators=(",", ":")))
    if size > max_args_bytes:
        return (f"arguments are {size} bytes, above the tool's max_args_bytes "
                f"({max_args_bytes}); send a reference instead of the data")
    if embed and nested_deeper_than(embed, MAX_MESSAGE_DEPTH):
        return f"the message's callbacks nest more than {MAX_MESSAGE_DEPTH} levels deep"
    return None


def answer_refused(task: Any, task_id: str, problem: str) -> None:
    """Store FAILURE(InvalidToolCall) for a refused call, unless its id already has a result."""
    backend = task.backend
    if backend.get_state(task_id) in states.READY_STATES:
        logger.error("tool %s: refused a second message for task %s (%s); its first result "
                     "is kept", task.tool.name, task_id, problem)
        return
    backend.mark_as_failure(task_id, InvalidToolCall(task.tool.name, problem))


def guarded(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy for `task`, behind the checks above."""
    handle = default(task, app, consumer, **kwargs)
    errors = consumer.connection_errors
    max_eta_s = visibility_s(app)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                   **rest: Any) -> Any:
        headers = message.headers
        problem = message_problem(
            headers, message.body, lambda: message.payload, task.tool.max_args_bytes,
            max_eta_s,
        )
        if problem is None:
            try:
                return handle(message, body, ack, reject, callbacks, **rest)
            except errors:
                raise  # the broker connection: Celery reconnects
            except InvalidTaskError as exc:  # e.g. an `expires` Celery cannot read
                problem = f"Celery refused the message ({exc})"
            except Exception as exc:  # would stop the worker, and come back with the message
                problem = f"the message broke the worker's intake ({type(exc).__name__}: {exc})"
        _refuse(task, headers, problem)
        ack(logger, errors)
        return None

    return on_message


def _refuse(task: Any, headers: Any, problem: str) -> None:
    task_id = headers.get("id")
    logger.error("tool %s: refused the message of task %s: %s", task.tool.name,
                 f"{task_id!r:.80}", problem)
    if type(task_id) is int:  # answered where AsyncResult(str(id)) finds it
        task_id = str(task_id)
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_ID_CHARS:
        try:
            answer_refused(task, task_id, problem)
        except Exception as exc:  # an unreachable backend: the refusal is logged above
            logger.error("tool %s: refusal of task %s not stored (%s)", task.tool.name,
                         task_id, exc)
