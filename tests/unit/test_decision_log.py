"""The worker's decision lines: reason and wait, and Celery's `ignored` line dropped once."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from throttle.monitor import decisions
from throttle.monitor.flower_conf import format_task

POOLED = SimpleNamespace(pool="commerce_api", priority="expensive")
PLAIN = SimpleNamespace(pool=None, priority=None)


def test_a_decision_reads_as_its_outcome_wait_and_reason_with_the_pool_and_class() -> None:
    assert decisions.describe("delay", "pool", 42.04, POOLED) == (
        "delayed 42.0 s (pool commerce_api/expensive)")
    assert decisions.describe("delay", "reserved", 0.25, PLAIN) == "delayed 0.2 s (reserved)"
    assert decisions.describe("fallback", "deadline", 0.0, PLAIN) == "fallback (deadline)"


def ignored_record(call_id: str) -> logging.LogRecord:
    record = logging.LogRecord(decisions.CELERY_TRACE_LOGGER, logging.INFO, __file__, 1,
                               "Task %(name)s[%(id)s] %(description)s", None, None)
    record.data = {"id": call_id, "name": "tool.x", "description": "ignored"}
    return record


def test_celerys_ignored_line_is_dropped_only_for_the_call_just_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = SimpleNamespace(name="tool.x", request=SimpleNamespace(id="call-1"), tool=PLAIN)
    drop = decisions.DropIgnoredAfterDecision()
    assert drop.filter(ignored_record("call-1"))  # nothing logged for it yet
    with caplog.at_level(logging.INFO, logger="throttle.decisions"):
        decisions.log_decision(task, "fallback", "deadline", 0.0)
    assert caplog.messages == ["Task tool.x[call-1] fallback (deadline)"]
    assert drop.filter(ignored_record("call-2"))  # another call's line stays
    assert not drop.filter(ignored_record("call-1"))
    assert drop.filter(ignored_record("call-1"))  # once only: a later Ignore of its own stays


def test_flower_task_pages_list_the_call_fields_events_carried() -> None:
    from celery.events.state import Task

    task = Task(uuid="c1")
    assert format_task(task)._fields == Task._fields
    task.__dict__.update(reason="pool", wait_s=2.0, decision="delayed 2.0 s (pool a/b)")
    assert format_task(task)._fields == (*Task._fields, "decision", "reason", "wait_s")
