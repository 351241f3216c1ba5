"""`ThrottledTask`: validate the call, ask the gate, then run, delay to the slot, or fall back.

The task body stays a plain function of the tool's keyword arguments. Everything here runs
once per delivery: a delayed call is re-published with the same id and an ETA at its
reserved slot, and comes back to be admitted by its reservation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from celery import states
from celery.app.task import get_actual_ignore_result
from celery.exceptions import Ignore, Reject, Retry

from throttle import adaptive, eager, recovery
from throttle.decision import Action, Decision
from throttle.errors import InvalidToolCall, StoreUnavailable, UpstreamBusy
from throttle.headers import DEADLINE_S, DELAYS, ENQUEUED_AT, STORE_RETRIES, THROTTLE_HEADERS
from throttle.intake import POSITIONAL, header_count, header_number
from throttle.monitor import metrics
from throttle.results import FALLBACK_MARK, due_at_s, fallback_reason, outcome
from throttle.sending import SendingTask

if TYPE_CHECKING:
    from throttle.gate import Gate

logger = logging.getLogger("throttle")

__all__ = ["FALLBACK_MARK", "ThrottledTask", "due_at_s", "fallback_reason", "outcome"]

SLEEP_BELOW_S = 0.05
CONTENDED = frozenset({"concurrency", "cooldown"})  # pool waits hold a reserved slot: no jitter
MAX_SLEEPS = 5
STORE_BACKOFF_MAX_S = 30.0
STORE_LAST_TRY_S = 0.5  # the last store retry comes this long before the deadline


class ThrottledTask(SendingTask):
    """Base class of every tool task; `throttle` and `tool` are set per tool."""

    priority_again: ClassVar[int | None] = None
    # Messages are checked in the worker's main process before anything else reads them.
    Strategy = "throttle.intake:guarded"
    serializer = "json"  # whatever the app's task_serializer says

    def retry(self, args: Any = None, kwargs: Any = None, exc: Any = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        """Celery's retry, sent back through the gate as a new admission.

        The retry's deadline counts from when it is due; it carries no throttle delays.
        """
        request = self.request
        if not request.called_directly and not request.is_eager:
            if eta is None and countdown is None:
                countdown = self.default_retry_delay
            headers = {key: value for key, value in self._caller_headers().items()
                       if key not in THROTTLE_HEADERS}
            headers |= options.pop("headers", None) or {}
            headers[ENQUEUED_AT] = due_at_s(countdown, eta)
            _, caller_s = self._origin()
            if caller_s is not None:
                headers[DEADLINE_S] = caller_s
            options["headers"] = headers
            member = recovery.member_of(str(request.id), (request.retries or 0) + 1)
            call = request.kwargs if kwargs is None else kwargs
            registered = self._register(member, dict(call or {}), headers,
                                        recovery.canvas_of_request(request))
            try:
                return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries,
                                     **options)
            except (Retry, Reject):  # sent (or its publish failed: the reaper sends it)
                raise
            except BaseException:  # not retried (max_retries): nothing to recover
                if registered:
                    with contextlib.suppress(StoreUnavailable):
                        self.throttle.gate.forget_call(self.tool.name, member)
                raise
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    # -- worker side --------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request  # a lookup in Celery's request stack: read once per call
        if request.called_directly:
            return self.run(*args, **kwargs)
        kwargs = self.check_arguments(args, kwargs) if request.is_eager else \
            self._delivered_arguments(args, kwargs)
        gate = self.throttle.gate
        fair_key = self._fair_key_of(kwargs, gate)
        decision = self._decide(kwargs, request, gate, fair_key)
        if decision.action is Action.ADMIT:
            request.throttle_admitted_at = decision.slot_at
            metrics.observe_decision(self, "admit", decision.reason, 0.0, tenant=fair_key,
                                     request=request)
            return self._run(kwargs, gate)
        if decision.action is Action.DELAY:
            self._republish(decision.wait_s, decision.reason)
        return self._fall_back(decision.reason)

    def _delivered_arguments(self, args: Any, kwargs: Any) -> dict[str, Any]:
        """A worker delivery's keyword arguments, if they fit the tool's schema.

        Its message passed the intake (`throttle.intake.guarded`, this task's strategy),
        which refuses positional arguments and checks size and depth as `check_arguments`
        does: only the schema is left to check here.
        """
        if args:
            raise InvalidToolCall(self.tool.name, POSITIONAL)
        checked: dict[str, Any] = dict(kwargs or {})
        self._check_schema(checked)
        return checked

    def _member(self, request: Any = None) -> str:
        """This delivery's member at the gate: the task id, with the body's retry number.

        A body's own retry (`self.retry()`, `autoretry_for`) is a new admission, counted in
        the windows like any call; a throttle delay keeps the member (and `retries`).
        `request`: the current request, when the caller has it at hand.
        """
        request = request or self.request
        return recovery.member_of(str(request.id), request.retries or 0)

    def _run(self, kwargs: dict[str, Any], gate: Gate) -> Any:
        """Run the body; settle its charge, give back its lease, and obey an upstream pause."""
        started = time.perf_counter()
        status = "error"
        answers: list[adaptive.Answer] = []  # what the body hands to report_headers
        try:
            with adaptive.collecting(answers):
                result = self.run(**kwargs)
            status = "success"
        except UpstreamBusy as busy:
            status = "busy"
            return self._cool_down(busy, kwargs)  # the fallback, or it re-publishes the call
        finally:
            metrics.observe_run(self, status, time.perf_counter() - started)
            if self.tool.concurrency is not None:
                self._finish_lease(kwargs)
            if status != "error" and gate.adapter.adapts(self.tool.name):
                self._report_answers(answers, busy=status == "busy")
        units = self.tool.settled_units(kwargs, result)
        if units is not None:
            try:
                gate.settle(
                    self.tool.name, self._member(), units, key=self._key_of(kwargs)
                )
            except StoreUnavailable as exc:
                metrics.observe_store_error(self)
                logger.warning("tool %s: charge not settled (%s)", self.tool.name, exc)
        return result

    def _report_answers(self, answers: list[adaptive.Answer], *, busy: bool) -> None:
        """Move the adaptive limits by what the upstream said (never fails the call)."""
        try:
            self.throttle.gate.adapter.report(self.tool.name, answers, busy=busy,
                                              member=self._member())
        except StoreUnavailable as exc:
            metrics.observe_store_error(self)
            logger.warning("tool %s: upstream limits not reported (%s)", self.tool.name, exc)

    def _cool_down(self, busy: UpstreamBusy, kwargs: dict[str, Any]) -> Any:
        """Pause the tool (or its pool) everywhere, then send this call back to wait it out.

        Returns the fallback when the pause outlasts the call's deadline.
        """
        logger.warning("tool %s: %s; pausing it on every worker", self.tool.name, busy)
        try:
            self.throttle.gate.cool_down(
                self.tool.name, busy.retry_after_s, key=self._key_of(kwargs),
                member=self._member(),
            )
        except StoreUnavailable as exc:
            metrics.observe_store_error(self)
            logger.warning("tool %s: cooldown not shared (%s)", self.tool.name, exc)
        if busy.retry_after_s > self._deadline_left_s():
            return self._fall_back("cooldown")  # the pause outlasts the deadline
        # The gate forgot the call when it admitted it; the re-publish could be lost too.
        self._register(self._member(), kwargs, self._origin_headers(),
                       recovery.canvas_of_request(self.request))
        jitter_s = random.uniform(0, 0.1 * busy.retry_after_s + 0.02)
        self._republish(busy.retry_after_s + jitter_s, "cooldown")

    def _decide(self, kwargs: dict[str, Any], request: Any, gate: Gate,
                fair_key: Any) -> Decision:
        """Ask the gate, sleeping out small waits; store outages follow the tool's policy."""
        member = self._member(request)
        key = self._key_of(kwargs)
        cost = self.tool.units(kwargs)
        # This message, this delivery of it (64 random bits tell deliveries apart).
        receipt = f"{self._message_tag(request)}|{os.urandom(8).hex()}"
        for _ in range(MAX_SLEEPS):
            try:
                decision = gate.acquire(
                    self.tool.name, member, key=key, cost=cost,
                    deadline_s=self._deadline_left_s(request), receipt=receipt,
                    fair_key=fair_key,
                )
            except StoreUnavailable as exc:
                metrics.observe_store_error(self)
                return self._on_store_error(exc)
            if decision.action is Action.ADMIT and self._redelivered(decision, request):
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
            self.throttle.gate.finish(self.tool.name, self._member(), key=key)
        except StoreUnavailable as exc:
            metrics.observe_store_error(self)
            logger.warning(
                "tool %s: lease not returned (%s); it expires on its own", self.tool.name, exc
            )

    def _key_of(self, kwargs: dict[str, Any]) -> Any:
        """The value of the tool's key argument (None when its limits are not per key)."""
        return kwargs.get(self.tool.key) if self.tool.key else None

    def _fair_key_of(self, kwargs: dict[str, Any], gate: Gate) -> Any:
        """The call's tenant: the value of its tool's (or pool's) `fair_by` argument."""
        fair = gate.fairness.get(self.tool.name)
        return kwargs.get(fair.by) if fair else None

    def _header(self, name: str, request: Any = None) -> Any:
        """A header of the call: a request attribute on a worker, in `headers` when eager."""
        request = request or self.request
        value = getattr(request, name, None)
        if value is None and request.is_eager:
            value = (request.headers or {}).get(name)
        return value

    def _deadline_left_s(self, request: Any = None) -> float:
        enqueued_at, caller_s = self._origin(request)
        budget_s = self.tool.max_delay_ms / 1000
        if caller_s is not None:
            budget_s = min(budget_s, caller_s)
        return budget_s - (time.time() - enqueued_at)  # negative once it has passed

    def _origin(self, request: Any = None) -> tuple[float, float | None]:
        """The call's first-enqueue time and caller deadline, from headers any caller can
        set: a time not a number or in the future reads as now (this worker's clock); a
        deadline that is not a number is ignored (the tool's max_delay still bounds it)."""
        request = request or self.request
        now = time.time()
        enqueued_at = header_number(self._header(ENQUEUED_AT, request))
        if enqueued_at is None or enqueued_at > now:
            enqueued_at = now
        return enqueued_at, header_number(self._header(DEADLINE_S, request))

    def _message_tag(self, request: Any) -> str:
        """The tag kombu's Redis transport gives a message when published and keeps when it
        delivers it again ('' on RabbitMQ)."""
        properties = getattr(request, "properties", None) or {}
        return str(properties.get("delivery_tag") or "").replace("|", "")

    def _redelivered(self, decision: Decision, request: Any) -> bool:
        """Whether this delivery repeats a run whose worker was lost.

        'rerun': the message the gate admitted, delivered again (its tag is the one the gate
        recorded). 'reused': another message with the id: a redelivery only if RabbitMQ
        flagged it (on Redis the flag is written by the publisher, who may forge it), else
        a second, independent call reusing the id: refused here, its body never runs, and
        the first call's result stays. 'readmitted' is this same delivery asking again,
        and a restored delay ('reservation') never ran: neither is counted.
        """
        flagged = bool((request.delivery_info or {}).get("redelivered"))
        if decision.reason == "rerun":
            return True
        if decision.reason == "reused" and not (flagged and self.throttle.trusts_redelivered):
            logger.error(
                "tool %s: refused a second message with task id %s, which the gate already "
                "admitted: a reused id is not a redelivery. Its body did not run and the first "
                "call's result is kept; give every call its own id", self.tool.name,
                request.id,
            )
            raise Ignore(f"task id {request.id} reused")
        return flagged and decision.reason in ("admitted", "reused")

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
            tries = header_count(getattr(self.request, STORE_RETRIES, 0))
            backoff_s = min(STORE_BACKOFF_MAX_S, 2.0**tries) * (0.5 + random.random() / 2)
            # Never past the deadline, but one last try just before it.
            backoff_s = min(backoff_s, self._deadline_left_s() - STORE_LAST_TRY_S)
            if backoff_s > 0:
                self._republish(backoff_s, "store_unavailable", store_retries=tries + 1)
        return Decision(Action.FALLBACK, 0.0, time.time(), "store_unavailable")

    def _caller_headers(self) -> dict[str, Any]:
        """The call's custom headers (the caller's and throttle's; RabbitMQ's x-death left out),
        carried by every re-publish and retry."""
        return dict(self.request.as_execution_options()["headers"])

    def _origin_headers(self) -> dict[str, Any]:
        """The call's first-enqueue time and caller deadline, carried by every re-publish."""
        enqueued_at, caller_s = self._origin()
        headers: dict[str, Any] = {ENQUEUED_AT: enqueued_at}
        if caller_s is not None:
            headers[DEADLINE_S] = caller_s
        return headers

    def _republish(self, wait_s: float, reason: str, *, store_retries: int = 0) -> NoReturn:
        """Publish this call again (same id) due in `wait_s`, then ack the current message.

        The publish must succeed before the original is acked: on failure the original is
        requeued, and its reservation is honoured when it comes back.
        """
        request = self.request
        if request.is_eager:
            metrics.observe_decision(self, "delay", reason, wait_s)
            raise eager.WaitEagerly(wait_s, reason)
        headers = {
            **self._caller_headers(),
            **self._origin_headers(),
            DELAYS: header_count(getattr(request, DELAYS, 0)) + 1,
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
        """Return the tool's fallback as this call's result, stored marked as a fallback.

        It goes through Celery's normal return path (chain, chord, link callbacks, the
        task-succeeded event); the marked result is stored first and Celery's own store is
        skipped, so no reader ever sees the SUCCESS without its mark. The gate has already
        given back any reservation it refused.
        """
        metrics.observe_decision(self, "fallback", reason, 0.0)
        if self.request.is_eager:
            raise eager.FallBackEagerly(reason)
        result = self.tool.fallback
        request = self.request
        if not get_actual_ignore_result(self, request):
            self.backend.store_result(request.id, result, states.SUCCESS, request=request,
                                      traceback=f"{FALLBACK_MARK} ({reason})")
            # Read by the backend's mark_as_done: stored once. (Celery's backends never
            # overwrite a SUCCESS either, so the stored fallback lists no children.)
            request.ignore_result = True
        return result

