"""The worker's decision lines: reason and wait, and Celery's `ignored` line dropped once."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from throttle.monitor import decisions
from throttle.monitor.flower import CALL_FIELDS, show_call_fields

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


def test_flower_lists_the_call_fields_and_copies_of_a_task_keep_them() -> None:
    import copy

    from celery.events.state import Task

    class FlowerTask(Task):  # type: ignore[misc]  # a subclass: Celery's own stays as it is
        pass

    show_call_fields(FlowerTask)
    show_call_fields(FlowerTask)  # twice is once
    assert FlowerTask._fields == (*Task._fields, *CALL_FIELDS)
    task = FlowerTask(uuid="c1")
    assert task.as_dict()["decision"] is None
    task.__dict__.update(reason="pool", wait_s=2.0, decision="delayed 2.0 s (pool a/b)")
    assert copy.copy(task).decision == "delayed 2.0 s (pool a/b)"  # Flower renders copies
    assert task.as_dict()["wait_s"] == 2.0
