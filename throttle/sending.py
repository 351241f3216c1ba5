"""The caller's side of a tool's task: check the call, register it, publish it.

`.delay()` / `apply_async` validate the arguments (schema, size, depth) before anything is
enqueued, queue the call's registration for the reaper (Redis brokers; sent in the
background, see throttle/registrar.py), and publish it on the tool's queue with the headers
below; `apply` runs it in this process (eager mode).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task, signals
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from throttle import eager, recovery, registrar
from throttle.config import ToolConfig
from throttle.errors import InvalidToolCall, StoreUnavailable
from throttle.gate import Registration
from throttle.headers import DEADLINE_S, ENQUEUED_AT
from throttle.intake import (
    MAX_ARGS_DEPTH,
    POSITIONAL,
    header_number,
    nested_deeper_than,
    reused_id_problem,
    schedule_problem,
    too_deep,
    visibility_s,
)
from throttle.results import FALLBACK_MARK, due_at_s
from throttle.schema_check import SchemaCheck

if TYPE_CHECKING:
    from throttle.owner import Owner

COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # the size a call's arguments count
ANY_OBJECT = {"type": "object"}  # a tool's default params: any keyword arguments pass


class SendingTask(Task):  # type: ignore[misc]
    """What a tool's task does where it is called; `throttle` and `tool` are set per tool."""

    throttle: ClassVar[Owner]
    tool: ClassVar[ToolConfig]
    _schema: ClassVar[SchemaCheck]

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        *,
        deadline_s: float | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Validate the arguments, then enqueue on the tool's queue.

        `deadline_s` tightens the tool's max_delay for this call.
        """
        headers = dict(options.pop("headers", None) or {})
        if args and options.get("parent_id") is not None:
            # A chain step or callback handed the previous result positionally: the worker
            # refuses it as this step's failure, so the canvas fails here, not its parent.
            return super().apply_async(args, kwargs, headers=headers, **options)
        checked, checked_json = self._checked(args, kwargs)
        self._check_schedule(options)
        if ENQUEUED_AT in headers:  # published again by the worker or the reaper
            return super().apply_async(args, kwargs, headers=headers, **options)
        headers[ENQUEUED_AT] = due_at_s(options.get("countdown"), options.get("eta"))
        if deadline_s is not None:
            if header_number(deadline_s) is None:
                raise InvalidToolCall(
                    self.tool.name, f"deadline_s must be a finite number of seconds, got "
                    f"{deadline_s!r:.40}"
                )
            headers[DEADLINE_S] = float(deadline_s)
        task_id = options.pop("task_id", None)
        if task_id is not None:
            self._check_unused(task_id)
        task_id = task_id or uuid()
        # The registration is queued for the registrar (or, its queue full, sent now and
        # confirmed once the call is published).
        queued, registration = self._queue_registration(task_id, checked, headers,
                                                        recovery.canvas_of(options), checked_json)
        try:
            result = super().apply_async(
                args, kwargs, task_id=task_id, headers=headers, **options
            )
        except BaseException:  # (not only Exception: its connection must go back)
            if queued or registration is not None:
                with contextlib.suppress(StoreUnavailable):
                    if registration is not None:
                        registration.wait()  # done before it is taken back
                    self.throttle.gate.forget_call(self.tool.name, task_id)  # (and dequeued)
            raise
        if registration is not None:
            self._confirm(registration, task_id)
        return result

    def _one_task_per_call(self, *_: Any, **__: Any) -> Any:
        raise InvalidToolCall(
            self.tool.name,
            "starmap(), chunks() and map() would run every call inside one task, past the "
            f"gate; send one task per call: group({self.tool.name}.s(**kwargs) for kwargs in ...)",
        )

    starmap = chunks = map = _one_task_per_call

    def _check_schedule(self, options: dict[str, Any]) -> None:
        if options.get("eta") is None and options.get("countdown") is None:
            return  # (due now: the visibility timeout is not read)
        if problem := schedule_problem(options, visibility_s(self.app)):
            raise InvalidToolCall(self.tool.name, problem)

    def _check_unused(self, task_id: Any) -> None:
        if problem := reused_id_problem(self.backend, task_id):
            raise InvalidToolCall(self.tool.name, problem)

    def _register(self, member: str, kwargs: dict[str, Any], headers: dict[str, Any],
                  canvas: dict[str, Any] | None = None) -> bool:
        """Register the call (its gate member) so the reaper can re-publish it if the broker
        loses it."""
        registration = self._start_registration(member, kwargs, headers, canvas)
        return registration is not None and self._confirm(registration, member)

    def _queue_registration(
        self, member: str, kwargs: dict[str, Any], headers: dict[str, Any],
        canvas: dict[str, Any], kwargs_json: str | None = None,
    ) -> tuple[bool, Registration | None]:
        """Queue the call's registration for the registrar: (True, None); its queue full,
        send it now: (False, the registration to confirm); (False, None): not registered."""
        entry = self._registry_entry(kwargs, headers, canvas, kwargs_json)
        if entry is None:
            return False, None
        call, check_at = entry
        if self.throttle.gate.register_later(self.tool.name, member, call, check_at):
            return True, None
        return False, self._send_registration(member, call, check_at)

    def _start_registration(
        self, member: str, kwargs: dict[str, Any], headers: dict[str, Any],
        canvas: dict[str, Any] | None = None,
    ) -> Registration | None:
        """Send the call's registration (None: not registered, see `_register`)."""
        entry = self._registry_entry(kwargs, headers, canvas)
        return None if entry is None else self._send_registration(member, *entry)

    def _registry_entry(
        self, kwargs: dict[str, Any], headers: dict[str, Any], canvas: dict[str, Any] | None,
        kwargs_json: str | None = None,
    ) -> tuple[str, float] | None:
        """The call's message for the reaper and its check time (None: not registered);
        `kwargs_json`: the arguments as `_checked` encoded them."""
        if not self.throttle.register_calls or self.app.conf.task_always_eager:
            return None
        budget_s = self.tool.max_delay_ms / 1000
        if DEADLINE_S in headers:
            budget_s = min(budget_s, float(headers[DEADLINE_S]))
        check_at = recovery.check_at_s(float(headers[ENQUEUED_AT]), budget_s)
        return recovery.message(kwargs, headers, check_at, canvas,
                                kwargs_json=kwargs_json), check_at

    def _send_registration(self, member: str, call: str, check_at: float
                           ) -> Registration | None:
        try:
            return self.throttle.gate.start_register_call(self.tool.name, member, call, check_at)
        except StoreUnavailable as exc:
            self._not_registered(member, exc)
            return None

    def _confirm(self, registration: Registration, member: str) -> bool:
        try:
            registration.wait()
        except StoreUnavailable as exc:
            self._not_registered(member, exc)
            return False
        return True

    def _not_registered(self, member: str, exc: StoreUnavailable) -> None:
        registrar.not_registered(self.tool.name, member, exc)

    def check_arguments(self, args: Any, kwargs: Any, *, parsed: bool = False) -> dict[str, Any]:
        """The call's keyword arguments if they fit the tool's schema and size, else raise.

        `parsed`: the arguments were decoded from JSON (the gateway's), so the fast schema
        check may vouch for them (throttle.schema_check).
        """
        return self._checked(args, kwargs, parsed=parsed)[0]

    def _checked(self, args: Any, kwargs: Any, *, parsed: bool = False
                 ) -> tuple[dict[str, Any], str]:
        """`check_arguments`, and the arguments as the compact JSON their size was taken of."""
        if args:
            raise InvalidToolCall(self.tool.name, POSITIONAL)
        checked: dict[str, Any] = dict(kwargs or {})
        try:
            encoded = COMPACT_JSON.encode(checked)
        except RecursionError:
            raise InvalidToolCall(self.tool.name, too_deep(MAX_ARGS_DEPTH)) from None
        except (TypeError, ValueError) as exc:
            raise InvalidToolCall(self.tool.name, f"arguments are not JSON: {exc}") from None
        if len(encoded) > self.tool.max_args_bytes:
            raise InvalidToolCall(
                self.tool.name,
                f"arguments are {len(encoded)} bytes, above the tool's max_args_bytes "
                f"({self.tool.max_args_bytes}); send a reference instead of the data",
            )
        if nested_deeper_than(checked, MAX_ARGS_DEPTH):
            raise InvalidToolCall(self.tool.name, too_deep(MAX_ARGS_DEPTH))
        self._check_schema(checked, parsed=parsed)
        return checked, encoded

    def _check_schema(self, checked: dict[str, Any], *, parsed: bool = False) -> None:
        """Raise InvalidToolCall unless the arguments fit the tool's schema."""
        if self._schema.validator.schema == ANY_OBJECT:
            return
        error = self._schema.first_error(checked, parsed=parsed)
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "arguments"
            raise InvalidToolCall(self.tool.name, f"{where}: {error.message}")

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run the call in this process (eager mode): waits are slept here, never re-published."""
        headers = {ENQUEUED_AT: time.time(), **(options.pop("headers", None) or {})}
        return eager.apply(self, super().apply, args, kwargs, headers=headers,
                           fallback_mark=FALLBACK_MARK, **options)


# A pool process ends with os._exit (no atexit): send what it queued first.
signals.worker_process_shutdown.connect(registrar.flush_all, weak=False)
signals.worker_shutdown.connect(registrar.flush_all, weak=False)
