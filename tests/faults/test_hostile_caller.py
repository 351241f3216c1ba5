"""A hostile or careless caller: messages published past every check, reused task ids,
origin headers that lie.

Each test ends with every worker alive, every call answered (a result, a fallback, or a
FAILURE naming what was wrong) and no window over its limit.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from tests.apps.ledger import build
from tests.integration.test_celery_flow import burst, tool
from tests.support.messages import publish_message
from tests.support.workers import Cluster, await_outcomes, check_ledger, ledger
from throttle import InvalidToolCall
from throttle.keys import tool_keys

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def headers_for(task: str, task_id: Any, **extra: Any) -> dict[str, Any]:
    """The protocol-2 headers Celery itself writes, for a hand-made message."""
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
            "group": None, "retries": 0, "timelimit": [None, None], "argsrepr": "",
            "kwargsrepr": "", "origin": "hostile", "ignore_result": False, **extra}


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def poison_messages(queue: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Label -> (body, headers) of messages no `.delay()` would send."""
    def call(label: str, body: Any, **extra: Any) -> tuple[Any, dict[str, Any]]:
        return body, headers_for(queue, f"poison-{label}-{uuid.uuid4().hex[:8]}", **extra)

    deep_json = ("[" * 3000 + "1" + "]" * 3000).encode()
    year_ahead = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    return {
        "nested 500 deep": call("deep", [[], {"n": 1, "pad": nested(500)}, EMBED]),
        "nested 3000 deep": call("deeper", b'[[], {"n": 1, "pad": ' + deep_json + b"}, {}]"),
        "kwargs a list": call("kwlist", [[], [1, 2], EMBED]),
        "positional args": call("args", [[1], {}, EMBED]),
        "body not Celery's": call("shape", {"hello": "world"}),
        "not JSON": call("garbage", b"\x00\xff not json {"),
        "huge": call("huge", [[], {"n": 1, "pad": "x" * 3_000_000}, EMBED]),
        "over max_args_bytes": call("big", [[], {"n": 1, "pad": "x" * 70_000}, EMBED]),
        "deep header": call("deephdr", [[], {"n": 1}, EMBED], extra=nested(500)),
        "timelimit garbage": call("tl", [[], {"n": 1}, EMBED], timelimit=["a", {}]),
        "retries a string": call("retries", [[], {"n": 1}, EMBED], retries="many"),
        "expires garbage": call("expires", [[], {"n": 1}, EMBED], expires="not a date"),
        "eta a year ahead": call("eta", [[], {"n": 1}, EMBED], eta=year_ahead),
    }


def state_and_error(result: AsyncResult, timeout_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while result.state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.05)
    error = result.result if result.state == "FAILURE" else None
    return result.state, f"{type(error).__name__}: {error}"


def test_poison_messages_are_answered_and_acked_and_the_prefork_worker_serves_on(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    cluster: Cluster = make_cluster({"tools": {"open": tool(["100/1s"], "10s")}})
    cluster.start(1, concurrency=2)  # prefork: the pool pickles what it gets
    app, _, _ = build(cluster.env)
    poisons = poison_messages("tool.open")
    for body, headers in poisons.values():
        publish_message(app, "tool.open", body, headers)
    # Ids of the wrong type: one answered where AsyncResult(str(id)) finds it, one unanswerable.
    publish_message(app, "tool.open", [[], {"n": 1}, EMBED], headers_for("tool.open", 424242))
    publish_message(app, "tool.open", [[], {"n": 1}, EMBED], headers_for("tool.open", ["x"]))

    # Origin headers that lie: read as "now" and ignored, the call is served as usual.
    lying = headers_for("tool.open", f"lying-{uuid.uuid4().hex[:8]}", throttle_enqueued_at="x",
                        throttle_deadline_s=[1], throttle_delays="many",
                        throttle_store_retries=10**9)
    publish_message(app, "tool.open", [[], {"n": 99}, EMBED], lying)

    answers = {
        label: state_and_error(AsyncResult(headers["id"], app=app), 30)
        for label, (_, headers) in poisons.items()
    }
    int_id = state_and_error(AsyncResult("424242", app=app), 10)
    lied = AsyncResult(lying["id"], app=app).get(timeout=10)
    results, _ = burst(cluster, "open", 5)
    served = await_outcomes(results, 30)
    time.sleep(1.0)  # anything requeued would be back by now
    broker = redis.Redis.from_url(redis_dbs[0])
    left = sum(broker.llen(name) for name in broker.scan_iter(match="tool.open*"))
    left += broker.hlen("unacked")
    logs = cluster.logs()
    print("\npoison answers:\n" + "\n".join(f"  {k}: {v[0]} {v[1][:110]}"
                                             for k, v in answers.items()))
    print(f"  int id: {int_id[0]}; later calls {dict(served)}; left in broker {left}; "
          f"worker alive {cluster.alive()}/1; restarts logged "
          f"{logs.count('Unrecoverable error')}")
    assert cluster.alive() == 1
    assert "Unrecoverable error" not in logs and "RecursionError" not in logs.split("refused")[0]
    assert served == {"result": 5}
    for label, (state, error) in answers.items():
        assert state == "FAILURE", label
        assert error.startswith("InvalidToolCall: invalid call to tool 'open'"), (label, error)
    assert "pass arguments by keyword" in answers["positional args"][1]
    assert "levels deep" in answers["nested 500 deep"][1]
    assert "above the tool's max_args_bytes (65536)" in answers["over max_args_bytes"][1]
    assert int_id[0] == "FAILURE"
    assert "must be a string" in logs  # the list id: refused, logged, nothing to answer
    assert left == 0
    assert lied == {"n": 99}
    assert {run["n"] for run in ledger(redis_client, prefix)} == {*range(5), 99}


def test_an_enqueue_time_in_the_future_does_not_stretch_the_deadline_in_a_store_outage(
    make_cluster: Any, redis_dbs: tuple[str, str], redis_client: redis.Redis, redis_url: str,
) -> None:
    """The gate's Redis is unreachable and the tool's policy is to retry until max_delay
    (2 s). A caller who says the call was enqueued tomorrow gets the fallback after about
    2 s, not a day of retries; one who claims a 1-day deadline gets no more than max_delay."""
    config = {"tools": {"waits": tool(["5/1s"], "2s", on_store_error="delay")}}
    cluster = make_cluster(config, env={"THROTTLE_REDIS_URL": "redis://127.0.0.1:9/0",
                                        "THROTTLE_TEST_LEDGER_URL": redis_url})
    cluster.start(1, concurrency=2)
    _, _, tasks = build({**cluster.env, "THROTTLE_REDIS_URL": redis_url})
    started = time.monotonic()
    future = tasks["waits"].apply_async(
        kwargs={"n": 1}, headers={"throttle_enqueued_at": time.time() + 86_400}
    )
    long = tasks["waits"].apply_async(
        kwargs={"n": 2}, headers={"throttle_enqueued_at": time.time(),
                                  "throttle_deadline_s": 86_400.0}
    )
    ended = await_outcomes([future, long], 15)
    took_s = time.monotonic() - started
    print(f"\nfuture enqueue time / 1-day deadline in a store outage: {dict(ended)} after "
          f"{took_s:.1f} s (max_delay 2 s)")
    assert ended == {"fallback": 2}
    assert cluster.alive() == 1
    assert ledger(redis_client, cluster.env["THROTTLE_PREFIX"]) == []


def test_reused_task_ids_run_no_body_past_the_limit_and_keep_the_first_results(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    """5 messages for 2 task ids at 2/60s: the first of each id runs; the others (sent with
    `apply_async(task_id=...)` and with `send_task`, which skips every caller check, one of
    them claiming to be a redelivery) are refused without running, and never overwrite the
    first results."""
    cluster = make_cluster({"tools": {"paid": tool(["2/60s"], "2s")}})
    cluster.start(1, concurrency=2)
    app, _, tasks = build(cluster.env)
    paid = tasks["paid"]
    first = [paid.apply_async(kwargs={"n": n}, task_id=f"reused-{n}-{prefix}") for n in (0, 1)]
    again = [
        paid.apply_async(kwargs={"n": 2}, task_id=first[0].id),
        app.send_task("tool.paid", kwargs={"n": 3}, task_id=first[1].id, queue="tool.paid"),
        app.send_task("tool.paid", kwargs={"n": 4}, task_id=first[0].id, queue="tool.paid",
                      delivery_info={"redelivered": True}),  # a flag any publisher can write
    ]
    check = check_ledger(first, redis_client, prefix, window_s=60, timeout_s=20)
    time.sleep(1.5)  # the duplicates are decided by now
    values = [result.get(timeout=5) for result in first]
    broker = redis.Redis.from_url(redis_dbs[0])
    left = sum(broker.llen(name) for name in broker.scan_iter(match="tool.paid*"))
    left += broker.hlen("unacked")
    refused = cluster.logs().count("refused a second message with task id")
    print(f"\nreused ids: {check}; first results {values}; duplicates refused {refused}; "
          f"left in broker {left}")
    assert {run["n"] for run in ledger(redis_client, prefix)} == {0, 1}
    assert check.most <= 2 and check.run_twice == 0 and check.ended == {"result": 2}
    assert values == [{"n": 0}, {"n": 1}]
    assert [result.state for result in again] == ["SUCCESS"] * 3  # the first call's result
    assert refused == 3 and left == 0
    assert cluster.alive() == 1
    # Once a call has a result, the caller is told at once that its id is taken.
    with pytest.raises(InvalidToolCall, match="already names a finished call"):
        paid.apply_async(kwargs={"n": 5}, task_id=first[0].id)


def test_a_bodys_own_retry_is_gated_and_charged_as_a_new_call_not_refused_as_a_reused_id(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    """`self.retry()` re-sends the same task id: it is neither a redelivery run for free nor
    a reused id refused, but another call that takes its own unit of the window."""
    cluster = make_cluster({"tools": {"flaky": tool(["3/60s"], "2s")}},
                           env={"THROTTLE_TEST_RETRY": "0"})
    cluster.start(1, concurrency=2)
    _, _, tasks = build(cluster.env)
    retried = tasks["flaky"].delay(n=0)
    assert retried.get(timeout=20) == {"n": 0}
    others = [tasks["flaky"].delay(n=n) for n in (1, 2)]
    ended = await_outcomes(others, 20)
    runs = [run["n"] for run in ledger(redis_client, prefix)]
    gate_log = redis_client.zrange(tool_keys(prefix, "flaky").log, 0, -1)
    print(f"\nretry: bodies {runs}, gate log {gate_log}, later calls {dict(ended)}")
    assert runs[:2] == [0, 0]  # the first run and its retry
    assert retried.id.encode() in gate_log and f"{retried.id}~retry1".encode() in gate_log
    assert ended == {"result": 1, "fallback": 1}  # 3/60s: the retry took the second unit
    assert "refused a second message" not in cluster.logs()
