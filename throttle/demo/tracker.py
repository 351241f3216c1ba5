"""What became of every call the demo sent, seen from outside the workers.

Outcomes come from the result backend (`throttle.outcome`); admission times from the gate's
own log (a ZSET per tool: task id -> admission time in ms, by the Redis clock), read at
least four times per window, as an entry stays in the log for one window. Both work with
an in-process worker and with worker processes on other machines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult

from throttle.config import Config, ToolConfig
from throttle.keys import tool_keys
from throttle.task import outcome

DELAYED_AFTER_S = 0.5


@dataclass
class Call:
    """One call: when it was sent, admitted (gate clock) and answered, and how."""

    tool: str
    key_value: Any
    sent_at: float
    admitted_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None

    @property
    def wait_s(self) -> float | None:
        """Seconds from sending to admission, for a call that got the tool's answer."""
        if self.outcome != "result":
            return None
        started = self.admitted_at if self.admitted_at is not None else self.finished_at
        return None if started is None else max(0.0, started - self.sent_at)

    @property
    def delayed(self) -> bool:
        """Whether the call waited for a reserved slot (admitted over 0.5 s after sending)."""
        wait_s = self.wait_s
        return wait_s is not None and wait_s > DELAYED_AFTER_S


@dataclass(frozen=True, slots=True)
class GateView:
    """A tool's log at one instant: entries in each limit's trailing window, and reservations.

    For a tool limited per key, the busiest key's figures.
    """

    window_use: tuple[int, ...]
    reserved: int


@dataclass
class Tracker:
    """Calls by task id, refreshed from the gate's log (`poll_gate`) and the results."""

    app: Celery
    config: Config
    store: redis.Redis
    prefix: str
    calls: dict[str, Call] = field(default_factory=dict)
    gate: dict[str, GateView] = field(default_factory=dict)
    now_s: float = field(default_factory=time.time)
    _pending: set[str] = field(default_factory=set)
    _key_values: dict[str, set[Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self, tool: str, task_id: str, sent_at: float, kwargs: Mapping[str, Any]) -> None:
        """Record a call just enqueued (thread-safe)."""
        key_arg = self.config.tool(tool).key
        key_value = kwargs.get(key_arg) if key_arg else None
        with self._lock:
            self.calls[task_id] = Call(tool, key_value, sent_at)
            self._pending.add(task_id)
            if key_arg:
                self._key_values.setdefault(tool, set()).add(key_value)

    @property
    def unanswered(self) -> int:
        """Calls sent and not answered yet."""
        with self._lock:
            return len(self._pending)

    def calls_of(self, tool: str) -> list[Call]:
        """A snapshot of the calls of `tool`."""
        with self._lock:
            return [call for call in self.calls.values() if call.tool == tool]

    def poll_results(self) -> None:
        """Read the outcome of every call that was pending and is answered now."""
        with self._lock:
            pending = list(self._pending)
        if not pending:
            return
        for task_id, meta in self.app.backend.get_many(pending, interval=0, max_iterations=1):
            call = self.calls[task_id]
            call.outcome = outcome(AsyncResult(task_id, app=self.app))
            call.finished_at = _timestamp(meta.get("date_done")) or time.time()
            with self._lock:
                self._pending.discard(task_id)

    def poll_gate(self) -> None:
        """Read the gate's logs: admission times, window use and reservations."""
        with self._lock:
            targets = [
                (tool, value)
                for tool in self.config.tools.values()
                for value in (sorted(self._key_values.get(tool.name, ()), key=str)
                              if tool.key else [None])
            ]
        pipe = self.store.pipeline(transaction=False)
        pipe.time()
        for tool, value in targets:
            keys = tool_keys(self.prefix, tool.name, value)
            pipe.zrange(keys.log, 0, -1, withscores=True)
            pipe.zrange(keys.rsv, 0, -1)
        answers = pipe.execute()
        seconds, micros = answers[0]
        now_ms = int(seconds) * 1000 + int(micros) / 1000
        views: dict[str, list[GateView]] = {}
        for index, (tool, _) in enumerate(targets):
            log, reserved = answers[1 + 2 * index], set(answers[2 + 2 * index])
            self._note_admissions(log, reserved, now_ms)
            views.setdefault(tool.name, []).append(_view(tool, log, len(reserved), now_ms))
        self.gate = {name: _busiest(found) for name, found in views.items()}
        self.now_s = now_ms / 1000

    def _note_admissions(
        self, log: list[tuple[bytes, float]], reserved: set[bytes], now_ms: float
    ) -> None:
        for member, score in log:
            if member in reserved or score > now_ms:
                continue
            call = self.calls.get(member.decode())
            if call is not None and call.admitted_at is None:
                call.admitted_at = score / 1000


def _view(
    tool: ToolConfig, log: list[tuple[bytes, float]], reserved: int, now_ms: float
) -> GateView:
    use = tuple(
        sum(1 for _, score in log if now_ms - limit.window_ms < score <= now_ms)
        for limit in tool.limits
    )
    return GateView(use, reserved)


def _busiest(views: list[GateView]) -> GateView:
    return max(views, key=lambda view: (max(view.window_use, default=0), view.reserved))


def _timestamp(value: Any) -> float | None:
    """Epoch seconds of a result's `date_done` (an ISO string or a datetime)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
