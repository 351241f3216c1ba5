"""Calls the broker lost: registered when enqueued, re-published by a worker's reaper.

kombu's Redis transport takes a message with BRPOP and only then records it as unacked: a
consumer killed in between, or whose connection dies while it waits, loses the message it
was handed. So `.delay()` registers each call in the gate's Redis, and the gate takes it out
of the registry in the same script that admits or refuses it. A call still registered
`REAP_AFTER_S` after its deadline, while the tool's queue is empty, never reached the gate:
it was lost. The reaper (a timer in every worker, for the tools it serves) re-publishes it
with the same id; the gate, seeing its deadline passed, answers with the fallback, so the
caller gets an answer instead of waiting forever. While the queue holds messages, an
undecided call may still be among them: the reaper looks again later rather than doubling
a backlog. Claims are atomic, so any number of workers may reap.

A call is re-published once. Still undecided at its next check, it is given up: its result
becomes the tool's fallback, marked `lost` (the answer the gate would give a call past its
deadline), and it leaves the registry. A call that already has a result (a failure too) is
never re-published. So no message comes back forever, and every registered call is answered.

The registration keeps the call's place in a canvas (its chain, chord, links and ids): a call
published again keeps it, and a call given up continues its chain, chord part and links with
the fallback, as a worker does after a body returns.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery import signature, states
from celery.app.task import Context
from kombu.exceptions import ChannelError

from throttle.errors import StoreUnavailable
from throttle.results import FALLBACK_MARK

if TYPE_CHECKING:
    from throttle.owner import Owner

logger = logging.getLogger("throttle")

REAP_AFTER_S = 5.0  # past a call's deadline: later than any reservation's late grace
REAP_EVERY_S = 1.0
RETRY_S = 5.0  # a claimed call still undecided is looked at again after this
RETRY_MARK = "~retry"  # a body's retry n is registered (and gated) as <task id>~retry<n>
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def member_of(task_id: str, retries: int) -> str:
    """The gate's member for delivery `retries` of a task: its id, then `~retry<n>`."""
    return f"{task_id}{RETRY_MARK}{retries}" if retries else task_id


def check_at_s(enqueued_at: float, deadline_s: float) -> float:
    """When a call enqueued at `enqueued_at` counts as lost if the gate has not seen it."""
    return enqueued_at + deadline_s + REAP_AFTER_S


# apply_async's options that place a call in a canvas, and the request fields that hold them.
CANVAS = {"link": "callbacks", "link_error": "errbacks", "chain": "chain", "chord": "chord",
          "group_id": "group", "group_index": "group_index", "root_id": "root_id",
          "parent_id": "parent_id"}


def canvas_of(options: Mapping[str, Any]) -> dict[str, Any]:
    """The canvas options among a call's apply_async options."""
    return {name: options[name] for name in CANVAS if options.get(name) is not None}


def canvas_of_request(request: Any) -> dict[str, Any]:
    """The canvas options of the call a worker is running (for its retry or re-publish)."""
    return canvas_of({name: getattr(request, field, None) for name, field in CANVAS.items()})


def message(kwargs: Mapping[str, Any], headers: Mapping[str, Any], check_at: float,
            canvas: Mapping[str, Any] | None = None, *, kwargs_json: str | None = None) -> str:
    """What the reaper needs to publish the call again (and its first check time).

    `kwargs_json`: `kwargs` already encoded as compact JSON (`.delay()` measured them so),
    spliced in rather than encoded again.
    """
    if kwargs_json is None:
        kwargs_json = _COMPACT.encode(dict(kwargs))
    rest = _COMPACT.encode({"headers": dict(headers), "check_at": check_at,
                            "canvas": dict(canvas or {})})
    return f'{{"kwargs":{kwargs_json},{rest[1:]}'  # rest[1:]: '"headers":...}'


def reap(throttle: Owner, tools: Iterable[str], *, now_s: float | None = None) -> int:
    """Re-publish the lost calls of `tools`; returns how many were re-published."""
    now_s = time.time() if now_s is None else now_s
    published = 0
    for tool in tools:
        try:  # the gate too: a cluster client is made only once the cluster answers
            claimed = throttle.gate.claim_lost(tool, retry_s=RETRY_S, now_s=now_s)
        except StoreUnavailable as exc:
            logger.warning("tool %s: lost calls not checked (%s)", tool, exc)
            return published
        queue = throttle.config.tool(tool).queue
        if not claimed or _backlog(throttle, queue):
            continue
        task = throttle.app.tasks[queue]
        for task_id, raw in claimed:
            published += _republish(throttle, task, tool, task_id, raw, now_s)
    return published


def _republish(throttle: Owner, task: Any, tool: str, task_id: str, raw: str,
               now_s: float) -> int:
    if not raw or _finished(task, task_id.partition(RETRY_MARK)[0]):
        throttle.gate.forget_call(tool, task_id)
        return 0
    call = json.loads(raw)
    if call.get("reaped"):
        logger.error("tool %s: call %s was published again and still never reached the gate; "
                     "answering it with the fallback", tool, task_id)
        _answer_lost(throttle, task, tool, task_id, call.get("canvas") or {})
        return 0
    logger.warning("tool %s: call %s never reached the gate (the broker lost its message); "
                   "publishing it again", tool, task_id)
    real_id, _, retries = task_id.partition(RETRY_MARK)
    task.apply_async(kwargs=call["kwargs"], task_id=real_id, headers=call["headers"],
                     priority=task.priority_again, retries=int(retries or 0),
                     **(call.get("canvas") or {}))
    call["reaped"] = True  # the next claim gives it up
    throttle.gate.register_call(tool, task_id, json.dumps(call, separators=(",", ":")),
                                now_s + RETRY_S)
    return 1


def _answer_lost(throttle: Owner, task: Any, tool: str, task_id: str,
                 canvas: Mapping[str, Any]) -> None:
    """Answer a call given up with the tool's fallback (unless it got a result meanwhile),
    and continue what waits on it."""
    real_id = task_id.partition(RETRY_MARK)[0]
    if not _finished(task, real_id):
        fallback = throttle.config.tool(tool).fallback
        if not task.ignore_result:
            task.backend.store_result(real_id, fallback, states.SUCCESS,
                                      traceback=f"{FALLBACK_MARK} (lost)")
        try:
            _continue(task, real_id, fallback, canvas)
        except Exception:
            logger.exception("tool %s: call %s answered with the fallback, but what waits on "
                             "it (chain, chord, link) could not be sent", tool, real_id)
    throttle.gate.forget_call(tool, task_id)


def _continue(task: Any, task_id: str, value: Any, canvas: Mapping[str, Any]) -> None:
    """Send a call's chord part, next chain step and links, as Celery's worker does once a
    body returns `value`."""
    root_id = canvas.get("root_id") or task_id
    if canvas.get("chord"):
        request = Context(id=task_id, chord=canvas["chord"], group=canvas.get("group_id"),
                          group_index=canvas.get("group_index"), root_id=root_id,
                          parent_id=canvas.get("parent_id"), task=task.name)
        task.backend.on_chord_part_return(request, states.SUCCESS, value)
    steps = list(canvas.get("chain") or ())
    if steps:
        signature(steps.pop(), app=task.app).apply_async(
            (value,), chain=steps, parent_id=task_id, root_id=root_id)
    links = canvas.get("link") or ()
    for callback in [links] if isinstance(links, dict) else links:  # one, or a list
        signature(callback, app=task.app).apply_async((value,), parent_id=task_id,
                                                      root_id=root_id)


def _backlog(throttle: Owner, queue: str) -> bool:
    """Whether `queue` holds messages (or its depth cannot be read)."""
    try:
        with throttle.app.connection_for_read() as conn:
            depth = conn.default_channel.queue_declare(queue=queue, passive=True).message_count
    except ChannelError:  # Redis: an empty queue has no key
        return False
    except Exception as exc:
        logger.warning("queue %s: depth unknown (%s); lost calls checked later", queue, exc)
        return True
    return bool(depth)


def _finished(task: Any, task_id: str) -> bool:
    """Whether the call already has a result (decided without the gate, e.g. a store outage)."""
    try:
        return task.AsyncResult(task_id).state in states.READY_STATES
    except Exception:  # a disabled or unreachable backend: assume not finished
        return False
