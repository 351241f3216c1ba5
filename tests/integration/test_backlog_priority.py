"""docs/celery.md: a re-published delay goes ahead of the backlog of calls that have not met
the gate yet (message priority: 0 before 9 on Redis; 9 before 0 on RabbitMQ, whose tool
queues get `x-max-priority`).

A, B and then 1,500 calls are queued before the one worker process starts. A takes the only
slot of a second (1/1s); B is delayed to the next second and re-published. Had B's re-publish
gone to the back of the queue, the worker would take it only after deciding all 1,500 calls
queued behind it (seconds), far past its slot; it must be the next message it takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from amqp.exceptions import PreconditionFailed
from kombu import Connection

from tests.apps.ledger import build
from tests.integration.test_celery_flow import tool
from tests.support.rabbit import rabbitmq_queue
from tests.support.workers import ledger
from throttle.task import fallback_reason

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

BACKLOG = 1500


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_dbs: tuple[str, str]) -> Iterator[str]:
    if request.param == "redis":
        yield redis_dbs[0]
        return
    request.applymarker(pytest.mark.rabbitmq)
    with rabbitmq_queue("tool.lane") as url:
        yield url


def test_a_re_published_delay_is_taken_before_the_backlog_and_runs_at_its_slot(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, broker: str,
) -> None:
    config = {"broker": {"visibility_timeout": "5m"},
              "tools": {"lane": tool(["1/1s"], "4m")}}
    cluster = make_cluster(config, broker_url=broker)
    _, _, tasks = build(cluster.env)
    lane = tasks["lane"]
    lane.delay(n=0)  # A: the second's only slot
    b = lane.delay(n=1)  # B: delayed to the next free slot, then re-published
    for n in range(2, 2 + BACKLOG):  # the backlog, behind B
        lane.delay(n=n)
    cluster.start(1, concurrency=1)
    b.get(timeout=60)
    assert fallback_reason(b) is None, (
        f"B waited behind the backlog past its slot and fell back ({fallback_reason(b)})")
    runs = {run["n"]: run for run in ledger(redis_client, prefix)}
    b_run = runs[1]
    slot = datetime.fromisoformat(b_run["eta"]).timestamp()
    late_s = b_run["admitted_at"] - slot
    # The order in which the worker took messages (its log of received tasks):
    logs = cluster.logs()
    received = [line for line in logs.splitlines() if "Task tool.lane[" in line and
                "received" in line]
    b_first = next(i for i, line in enumerate(received) if b.id in line)
    b_again = next(i for i, line in enumerate(received) if b.id in line and i > b_first)
    print(f"\n{broker.split(':')[0]}: B admitted {late_s * 1000:.0f} ms after its slot; "
          f"its re-publish was the {b_again - b_first}th message the worker took after B "
          f"({len(received)} received in all)")
    assert b_run["delays"] == 1
    assert b_again - b_first <= 5, "the re-published B waited behind the backlog"
    assert late_s < 0.5


@pytest.mark.rabbitmq
def test_rabbitmq_tool_queues_are_declared_with_x_max_priority(
    make_cluster: Any,
) -> None:
    with rabbitmq_queue("tool.lane") as url:
        cluster = make_cluster({"tools": {"lane": tool(["1/1s"], "1m")}}, broker_url=url)
        cluster.start(1, concurrency=1)
        with Connection(url) as conn:
            channel = conn.channel()
            channel.queue_declare("tool.lane", durable=True, auto_delete=False,
                                  arguments={"x-max-priority": 9})  # the same: accepted
            with pytest.raises(PreconditionFailed, match="x-max-priority"):
                conn.channel().queue_declare("tool.lane", durable=True, auto_delete=False)
