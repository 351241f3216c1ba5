"""`ThrottledTask`: validate the call, ask the gate, then run, delay to the slot, or fall back.

The task body stays a plain function of the tool's keyword arguments. Everything here runs
once per delivery: a delayed call is re-published with the same id and an ETA at its
reserved slot, and comes back to be admitted by its reservation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import jsonschema
from celery import Task, states
from celery.exceptions import Ignore, Reject
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from throttle import eager, recovery
from throttle.config import ToolConfig
from throttle.errors import InvalidToolCall, StoreUnavailable, UpstreamBusy
from throttle.gate import Action, Decision, Registration
from throttle.monitor import metrics

if TYPE_CHECKING:
    from throttle.routing import Throttle

logger = logging.getLogger("throttle")

ENQUEUED_AT = "throttle_enqueued_at"
DEADLINE_S = "throttle_deadline_s"
DELAYS = "throttle_delays"
STORE_RETRIES = "throttle_store_retries"
FALLBACK_MARK = "throttle: fallback"
SLEEP_BELOW_S = 0.05
CONTENDED = frozenset({"pool", "concurrency", "cooldown"})
MAX_SLEEPS = 5
STORE_BACKOFF_MAX_S = 30.0
STORE_LAST_TRY_S = 0.5  # the last store retry comes this long before the deadline


def outcome(result: AsyncResult) -> Literal["result", "fallback"]:
    """Whether a finished call's `.get()` returned the tool's answer or its fallback.

    A fallback is stored as a normal SUCCESS whose `traceback` field reads
    "throttle: fallback (<reason>)"; `fallback_reason` returns that reason.
    """
    return "fallback" if fallback_reason(result) is not None else "result"


def fallback_reason(result: AsyncResult) -> str | None:
    """The reason a call fell back ('deadline', 'store_unavailable', ...), or None."""
    mark = result.traceback
    if isinstance(mark, str) and mark.startswith(FALLBACK_MARK):
        return mark[len(FALLBACK_MARK) :].strip(" ()")
    return None


class ThrottledTask(Task):  # type: ignore[misc]
    """Base class of every tool task; `throttle` and `tool` are set per tool."""

    throttle: ClassVar[Throttle]
    tool: ClassVar[ToolConfig]
    priority_again: ClassVar[int | None] = None
    _validator: ClassVar[jsonschema.protocols.Validator]

    # -- caller side --------------------------------------------------------------------
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
        if ENQUEUED_AT in headers:  # published again by the worker or the reaper
            return super().apply_async(args, kwargs, headers=headers, **options)
        checked = self.check_arguments(args, kwargs)
        headers[ENQUEUED_AT] = time.time()
        if deadline_s is not None:
            headers[DEADLINE_S] = float(deadline_s)
        task_id = options.pop("task_id", None) or uuid()
        # The registration is sent first, and confirmed once the call is published.
        registration = self._start_registration(task_id, checked, headers)
        try:
            result = super().apply_async(
                args, kwargs, task_id=task_id, headers=headers, **options
            )
        except BaseException:  # (not only Exception: its connection must go back)
            if registration is not None:
                with contextlib.suppress(StoreUnavailable):
                    registration.wait()  # done before it is taken back
                    self.throttle.gate.forget_call(self.tool.name, task_id)
            raise
        if registration is not None:
            self._confirm(registration, task_id)
        return result

    def _register(self, task_id: str, kwargs: dict[str, Any], headers: dict[str, Any]) -> bool:
        """Register the call so the reaper can re-publish it if the broker loses it."""
        registration = self._start_registration(task_id, kwargs, headers)
        return registration is not None and self._confirm(registration, task_id)

    def _start_registration(
        self, task_id: str, kwargs: dict[str, Any], headers: dict[str, Any]
    ) -> Registration | None:
        """Send the call's registration (None: not registered, see `_register`)."""
        if not self.throttle.register_calls or self.app.conf.task_always_eager:
            return None
        budget_s = self.tool.max_delay_ms / 1000
        if DEADLINE_S in headers:
            budget_s = min(budget_s, float(headers[DEADLINE_S]))
        check_at = recovery.check_at_s(float(headers[ENQUEUED_AT]), budget_s)
        try:
            return self.throttle.gate.start_register_call(
                self.tool.name, task_id, recovery.message(kwargs, headers, check_at), check_at
            )
        except StoreUnavailable as exc:
            self._not_registered(task_id, exc)
            return None

    def _confirm(self, registration: Registration, task_id: str) -> bool:
        try:
            registration.wait()
        except StoreUnavailable as exc:
            self._not_registered(task_id, exc)
            return False
        return True

    def _not_registered(self, task_id: str, exc: StoreUnavailable) -> None:
        logger.warning("tool %s: call %s not registered for recovery (%s)",
                       self.tool.name, task_id, exc)

    def check_arguments(self, args: Any, kwargs: Any) -> dict[str, Any]:
        """The call's keyword arguments if they fit the tool's schema and size, else raise."""
        if args:
            raise InvalidToolCall(
                self.tool.name, "pass arguments by keyword, e.g. .delay(query='...')"
            )
        checked: dict[str, Any] = dict(kwargs or {})
        try:
            size = len(json.dumps(checked, separators=(",", ":")))
        except (TypeError, ValueError) as exc:
            raise InvalidToolCall(self.tool.name, f"arguments are not JSON: {exc}") from None
        if size > self.tool.max_args_bytes:
            raise InvalidToolCall(
                self.tool.name,
                f"arguments are {size} bytes, above the tool's max_args_bytes "
                f"({self.tool.max_args_bytes}); send a reference instead of the data",
            )
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(checked))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "arguments"
            raise InvalidToolCall(self.tool.name, f"{where}: {error.message}")
        return checked

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run the call in this process (eager mode): waits are slept here, never re-published."""
        headers = {ENQUEUED_AT: time.time(), **(options.pop("headers", None) or {})}
        return eager.apply(self, super().apply, args, kwargs, headers=headers,
                           fallback_mark=FALLBACK_MARK, **options)

    # -- worker side --------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return self.run(*args, **kwargs)
        kwargs = self.check_arguments(args, kwargs)
        decision = self._decide(kwargs)
        if decision.action is Action.ADMIT:
            self.request.throttle_admitted_at = decision.slot_at
            metrics.observe_decision(self, "admit", decision.reason, 0.0)
            return self._run(kwargs)
        if decision.action is Action.DELAY:
            self._republish(decision.wait_s, decision.reason)
        return self._fall_back(decision.reason)

    def _run(self, kwargs: dict[str, Any]) -> Any:
        """Run the body; settle its charge, give back its lease, and obey an upstream pause."""
        started = time.perf_counter()
        status = "error"
        try:
            result = self.run(**kwargs)
            status = "success"
        except UpstreamBusy as busy:
            status = "busy"
            self._cool_down(busy, kwargs)
            raise  # not reached: _cool_down re-publishes the call
        finally:
            metrics.observe_run(self, status, time.perf_counter() - started)
            if self.tool.concurrency is not None:
                self._finish_lease(kwargs)
        units = self.tool.settled_units(kwargs, result)
        if units is not None:
            try:
                self.throttle.gate.settle(
                    self.tool.name, self.request.id, units, key=self._key_of(kwargs)
                )
            except StoreUnavailable as exc:
                metrics.observe_store_error(self)
                logger.warning("tool %s: charge not settled (%s)", self.tool.name, exc)
        return result

    def _cool_down(self, busy: UpstreamBusy, kwargs: dict[str, Any]) -> None:
        """Pause the tool (or its pool) everywhere, then send this call back to wait it out."""
        logger.warning("tool %s: %s; pausing it on every worker", self.tool.name, busy)
        try:
            self.throttle.gate.cool_down(
                self.tool.name, busy.retry_after_s, key=self._key_of(kwargs),
                member=self.request.id,
            )
        except StoreUnavailable as exc:
            metrics.observe_store_error(self)
            logger.warning("tool %s: cooldown not shared (%s)", self.tool.name, exc)
        if busy.retry_after_s > self._deadline_left_s():
            self._fall_back("cooldown")  # the pause outlasts the deadline
        # The gate forgot the call when it admitted it; the re-publish could be lost too.
        self._register(self.request.id, kwargs, self._origin_headers())
        jitter_s = random.uniform(0, 0.1 * busy.retry_after_s + 0.02)
        self._republish(busy.retry_after_s + jitter_s, "cooldown")

    def _decide(self, kwargs: dict[str, Any]) -> Decision:
        """Ask the gate, sleeping out small waits; store outages follow the tool's policy."""
        member = self.request.id
        key = self._key_of(kwargs)
        cost = self.tool.units(kwargs)
        for _ in range(MAX_SLEEPS):
            try:
                decision = self.throttle.gate.acquire(
                    self.tool.name, member, key=key, cost=cost,
                    deadline_s=self._deadline_left_s(),
                )
            except StoreUnavailable as exc:
                metrics.observe_store_error(self)
                return self._on_store_error(exc)
            if decision.action is Action.ADMIT and self._redelivered(decision):
                return self._check_redelivery(member, key, decision)
            logger.debug("%s %s: %s (%s, wait %.3fs)", self.tool.name, member, decision.action,
                         decision.reason, decision.wait_s)
            if decision.reason in CONTENDED:
                # Many calls wait for the same capacity: spread their return.
                jitter_s = random.uniform(0, 0.1 * decision.wait_s + 0.02)
                decision = replace(decision, wait_s=decision.wait_s + jitter_s)
            if decision.action is not Action.DELAY or decision.wait_s > SLEEP_BELOW_S:
                return decision
            time.sleep(decision.wait_s)
        return decision

    def _finish_lease(self, kwargs: dict[str, Any]) -> None:
        key = self._key_of(kwargs)
        try:
            self.throttle.gate.finish(self.tool.name, self.request.id, key=key)
        except StoreUnavailable as exc:
            metrics.observe_store_error(self)
            logger.warning(
                "tool %s: lease not returned (%s); it expires on its own", self.tool.name, exc
            )

    def _key_of(self, kwargs: dict[str, Any]) -> Any:
        """The value of the tool's key argument (None when its limits are not per key)."""
        return kwargs.get(self.tool.key) if self.tool.key else None

    def _header(self, name: str) -> Any:
        """A header of the call: a request attribute on a worker, in `headers` when eager."""
        value = getattr(self.request, name, None)
        if value is None and self.request.is_eager:
            value = (self.request.headers or {}).get(name)
        return value

    def _deadline_left_s(self) -> float:
        enqueued_at = self._header(ENQUEUED_AT) or time.time()
        budget_s = self.tool.max_delay_ms / 1000
        caller_s = self._header(DEADLINE_S)
        if caller_s is not None:
            budget_s = min(budget_s, float(caller_s))
        return budget_s - (time.time() - float(enqueued_at))  # negative once it has passed

    def _redelivered(self, decision: Decision) -> bool:
        """Whether this delivery repeats a run whose worker was lost.

        The gate knows while the first admission is in its windows ('readmitted'); after
        that only the broker's redelivered flag tells (kombu sets it on restored messages).
        A restored delay ('reservation') never ran: it is not counted.
        """
        if decision.reason == "readmitted":
            return True
        flagged = (self.request.delivery_info or {}).get("redelivered")
        return bool(flagged) and decision.reason == "admitted"

    def _check_redelivery(self, member: str, key: Any, decision: Decision) -> Decision:
        count = self.throttle.gate.note_redelivery(self.tool.name, member, key=key)
        if count > self.tool.max_redeliveries:
            logger.error(
                "tool %s: task %s was redelivered %d times after its worker was lost; "
                "parking it as a fallback (raise max_redeliveries to allow more)",
                self.tool.name, member, count,
            )
            return Decision(Action.FALLBACK, 0.0, decision.slot_at, "redelivery_cap")
        return decision

    def _on_store_error(self, exc: StoreUnavailable) -> Decision:
        policy = self.tool.on_store_error
        logger.warning("tool %s: %s; applying on_store_error=%s", self.tool.name, exc, policy)
        if policy == "admit":
            return Decision(Action.ADMIT, 0.0, time.time(), "store_unavailable")
        if policy == "delay":
            tries = int(getattr(self.request, STORE_RETRIES, 0) or 0)
            backoff_s = min(STORE_BACKOFF_MAX_S, 2.0**tries) * (0.5 + random.random() / 2)
            # Never past the deadline, but one last try just before it.
            backoff_s = min(backoff_s, self._deadline_left_s() - STORE_LAST_TRY_S)
            if backoff_s > 0:
                self._republish(backoff_s, "store_unavailable", store_retries=tries + 1)
        return Decision(Action.FALLBACK, 0.0, time.time(), "store_unavailable")

    def _origin_headers(self) -> dict[str, Any]:
        """The call's first-enqueue time and caller deadline, carried by every re-publish."""
        request = self.request
        headers = {ENQUEUED_AT: getattr(request, ENQUEUED_AT, None) or time.time()}
        if getattr(request, DEADLINE_S, None) is not None:
            headers[DEADLINE_S] = getattr(request, DEADLINE_S)
        return headers

    def _republish(self, wait_s: float, reason: str, *, store_retries: int = 0) -> None:
        """Publish this call again (same id) due in `wait_s`, then ack the current message.

        The publish must succeed before the original is acked: on failure the original is
        requeued, and its reservation is honoured when it comes back.
        """
        request = self.request
        if request.is_eager:
            metrics.observe_decision(self, "delay", reason, wait_s)
            raise eager.WaitEagerly(wait_s, reason)
        headers = {
            **self._origin_headers(),
            DELAYS: int(getattr(request, DELAYS, 0) or 0) + 1,
            STORE_RETRIES: store_retries,
        }
        try:
            self.signature_from_request(
                request, countdown=wait_s, headers=headers, retries=request.retries,
                priority=self.priority_again,
            ).apply_async()
        except Exception as exc:
            logger.warning(
                "tool %s: could not re-publish task %s (%s); requeueing it", self.tool.name,
                request.id, exc,
            )
            raise Reject(f"re-publish failed: {exc}", requeue=True) from exc
        metrics.observe_decision(self, "delay", reason, wait_s)
        raise Ignore(f"delayed {wait_s:.3f}s ({reason})")

    def _fall_back(self, reason: str) -> Any:
        """Store the tool's fallback as this call's result, marked as a fallback.

        The gate has already given back any reservation it refused.
        """
        metrics.observe_decision(self, "fallback", reason, 0.0)
        if self.request.is_eager:
            raise eager.FallBackEagerly(reason)
        result = self.tool.fallback
        if not self.request.ignore_result:
            self.backend.store_result(
                self.request.id, result, states.SUCCESS,
                traceback=f"{FALLBACK_MARK} ({reason})", request=self.request,
            )
        raise Ignore(f"fallback ({reason})")
