"""Throttled tools inside Celery canvases on real workers: chain, group, chord, link and
link_error, nested canvases; whatever the gate decides (admit, delay by re-publishing, a
fallback of every reason) and a call the worker refuses (InvalidToolCall).

A fallback is the call's result: the next step, the chord's body and link callbacks receive
it, while `outcome()` / `fallback_reason()` still tell it apart. Chord bodies run exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group

from tests.apps.ledger import build
from tests.support.monitoring import ledger_tool
from tests.support.rabbit import rabbitmq_queue
from tests.support.servers import free_port
from tests.support.workers import Cluster, ledger
from throttle import InvalidToolCall, fallback_reason, outcome

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

FALLBACK = {"n": -1}
POISON, BUSY = 666, 777  # the ledger body kills its process / raises UpstreamBusy for these
TOOLS = {
    "fast": ledger_tool(["2/1s"], "15s"),
    "paused": ledger_tool(["100/1s"], "5s"),
    "crashy": ledger_tool(["100/1s"], "15s", max_redeliveries=0),
}
ENV = {"THROTTLE_TEST_POISON": str(POISON), "THROTTLE_TEST_BUSY": str(BUSY)}
TIMEOUT_S = 45
SETTLE_S = 1.5  # a chord body that would run twice has time to do so


@pytest.fixture
def canvas(make_cluster: Any) -> tuple[Cluster, dict[str, Any]]:
    """Two worker nodes serving the tools and the default queue (where helpers run)."""
    cluster = make_cluster({"tools": TOOLS}, env=ENV)
    cluster.queues += ",celery"
    cluster.start(2, concurrency=2)
    _, _, tasks = build(cluster.env)
    return cluster, tasks


def collected(client: redis.Redis, prefix: str, label: str) -> list[Any]:
    """What `helpers.collect` received under `label`, in order (one entry per run)."""
    return [json.loads(raw) for raw in client.lrange(f"{prefix}:collected:{label}", 0, -1)]


def errors(client: redis.Redis, prefix: str, label: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(f"{prefix}:errors:{label}", 0, -1)]


def wait_for(check: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def check_chains_and_chords(tasks: dict[str, Any], client: redis.Redis, prefix: str,
                            tag: str) -> None:
    """Admitted and delayed calls in a chord, a chain, a group, a link and nested canvases."""
    fast, collect = tasks["fast"], tasks["collect"]
    header = chord([fast.s(n=i) for i in range(6)], collect.s(label=f"chord{tag}"))
    body = header.apply_async()
    steps = chain(fast.s(n=10), fast.si(n=11), collect.s(label=f"chain{tag}")).apply_async()
    nested = chain(fast.si(n=20), chord([fast.si(n=21), fast.si(n=22)],
                                        collect.s(label=f"nested{tag}"))).apply_async()
    assert body.get(timeout=TIMEOUT_S) == [{"n": i} for i in range(6)]
    assert steps.get(timeout=TIMEOUT_S) == {"n": 11}
    assert nested.get(timeout=TIMEOUT_S) == [{"n": 21}, {"n": 22}]
    time.sleep(SETTLE_S)
    assert collected(client, prefix, f"chord{tag}") == [[{"n": i} for i in range(6)]]
    assert collected(client, prefix, f"chain{tag}") == [{"n": 11}]
    assert collected(client, prefix, f"nested{tag}") == [[{"n": 21}, {"n": 22}]]
    runs = ledger(client, prefix)
    delays = {run["n"]: run["delays"] for run in runs}
    print(f"\ncanvas{tag}: {len(runs)} bodies ran, {sum(d > 0 for d in delays.values())} "
          f"after a re-published delay; chord bodies ran once each")
    # 2/1s: most of the 11 calls waited for their slot in a re-published message.
    assert sum(delays[i] > 0 for i in range(6)) >= 3
    assert len(runs) == len({run["id"] for run in runs}) == 11


def test_admitted_and_delayed_calls_flow_through_chains_chords_groups_and_links(
    canvas: tuple[Cluster, dict[str, Any]], redis_client: redis.Redis, prefix: str
) -> None:
    _, tasks = canvas
    check_chains_and_chords(tasks, redis_client, prefix, "")
    fast, collect = tasks["fast"], tasks["collect"]
    together = group(fast.s(n=i) for i in range(30, 34)).apply_async()
    linked = fast.apply_async(kwargs={"n": 40}, link=collect.s(label="link"))
    assert together.get(timeout=TIMEOUT_S) == [{"n": i} for i in range(30, 34)]
    assert linked.get(timeout=TIMEOUT_S) == {"n": 40}
    assert wait_for(lambda: collected(redis_client, prefix, "link")) == [{"n": 40}]


FALLBACK_CALLS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "deadline": lambda tasks: tasks["fast"].si(n=1).set(deadline_s=0),
    "cooldown": lambda tasks: tasks["paused"].si(n=BUSY),
    "redelivery_cap": lambda tasks: tasks["crashy"].si(n=POISON),
}


@pytest.mark.parametrize("reason", list(FALLBACK_CALLS))
def test_a_fallback_is_the_result_a_chain_a_chord_and_a_link_receive(
    canvas: tuple[Cluster, dict[str, Any]], redis_client: redis.Redis, prefix: str,
    reason: str,
) -> None:
    _, tasks = canvas
    check_fallbacks_in_canvases(tasks, FALLBACK_CALLS[reason], redis_client, prefix, reason)


def check_fallbacks_in_canvases(tasks: dict[str, Any], call: Callable[[dict[str, Any]], Any],
                                client: redis.Redis, prefix: str, reason: str) -> None:
    """`call(tasks)` falls back for `reason` as a chain's first step, in a chord's header
    (with another call beside it, admitted unless the store is down) and with a link: each
    receives the fallback once."""
    fast, collect = tasks["fast"], tasks["collect"]
    beside = FALLBACK if reason == "store_unavailable" else {"n": 2}
    steps = chain(call(tasks), collect.s(label="chain")).apply_async()
    body = chord([call(tasks), fast.si(n=2)], collect.s(label="chord")).apply_async()
    linked = call(tasks).apply_async(link=collect.s(label="link"))
    assert steps.get(timeout=TIMEOUT_S) == FALLBACK
    assert body.get(timeout=TIMEOUT_S) == [FALLBACK, beside]
    assert linked.get(timeout=TIMEOUT_S) == FALLBACK
    wait_for(lambda: collected(client, prefix, "link"))
    time.sleep(SETTLE_S)
    assert collected(client, prefix, "chain") == [FALLBACK]
    assert collected(client, prefix, "chord") == [[FALLBACK, beside]]
    assert collected(client, prefix, "link") == [FALLBACK]
    first_steps = [steps.parent, body.parent.results[0], linked]
    for result in first_steps:
        assert result.state == "SUCCESS"
        assert (outcome(result), fallback_reason(result)) == ("fallback", reason)
    assert outcome(body.parent.results[1]) == ("result" if beside != FALLBACK else "fallback")
    print(f"\nfallback ({reason}): chain, chord and link each received it once")


def test_a_store_outage_fallback_reaches_the_chain_the_chord_and_the_link(
    make_cluster: Any, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    dead_gate = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: the gate's store is down
    cluster = make_cluster({"tools": {"fast": ledger_tool(["2/1s"], "15s",
                                                          on_store_error="fallback")}},
                           env={"THROTTLE_REDIS_URL": dead_gate,
                                "THROTTLE_TEST_LEDGER_URL": redis_url})
    cluster.queues += ",celery"
    cluster.start(1, concurrency=2)
    _, _, tasks = build(cluster.env)
    check_fallbacks_in_canvases(tasks, lambda tasks: tasks["fast"].si(n=1), redis_client,
                                prefix, "store_unavailable")
    assert ledger(redis_client, prefix) == []


def test_a_refused_call_is_a_failure_for_link_error_a_chain_and_a_chord(
    canvas: tuple[Cluster, dict[str, Any]], redis_dbs: tuple[str, str],
    redis_client: redis.Redis, prefix: str,
) -> None:
    """Messages made without `.delay()` (an app that does not know the tools) with arguments
    the tool's schema refuses: link_error gets InvalidToolCall, the chain stops, the chord's
    body never runs and its errback gets the error; no body runs."""
    bare = Celery("bare", broker=redis_dbs[0], backend=redis_dbs[1])

    def bad() -> Any:
        return bare.signature("tool.fast", kwargs={"n": "one"}, queue="tool.fast")

    def helper(name: str, label: str) -> Any:
        return bare.signature(f"helpers.{name}", kwargs={"label": label}, queue="celery")

    refused = bad().apply_async(link_error=helper("record_error", "link_error"),
                                link=helper("collect", "link"))
    steps = chain(bad(), helper("collect", "chain")).on_error(
        helper("record_error", "chain_error")).apply_async()
    body = chord([bad(), bare.signature("tool.fast", kwargs={"n": 2}, queue="tool.fast")],
                 helper("collect", "chord").on_error(
                     helper("record_error", "chord_error"))).apply_async()
    for result in (refused, steps, body):
        with pytest.raises(Exception) as info:
            result.get(timeout=TIMEOUT_S)
        assert "is not of type 'integer'" in str(info.value)
    for label in ("link_error", "chain_error", "chord_error"):
        entry = wait_for(lambda label=label: errors(redis_client, prefix, label))
        assert len(entry) == 1 and "is not of type 'integer'" in entry[0]["message"], entry
    assert errors(redis_client, prefix, "link_error")[0]["type"] == "InvalidToolCall"
    assert refused.state == "FAILURE" and type(refused.result).__name__ == "InvalidToolCall"
    time.sleep(SETTLE_S)
    for label in ("link", "chain", "chord"):
        assert collected(redis_client, prefix, label) == [], label
    assert [run["n"] for run in ledger(redis_client, prefix)] == [2]  # only the valid call


def test_a_tool_step_handed_the_previous_result_fails_as_that_step(
    canvas: tuple[Cluster, dict[str, Any]],
) -> None:
    """`fast.s()` after a step gets its result positionally: that step fails with
    InvalidToolCall (saying to use `.si`), the step before keeps its answer or fallback."""
    _, tasks = canvas
    fast = tasks["fast"]
    for first, kind in ((fast.s(n=1), "result"), (fast.s(n=1).set(deadline_s=0), "fallback")):
        steps = chain(first, fast.s()).apply_async()
        with pytest.raises(InvalidToolCall, match=r"immutable signature, \.si\("):
            steps.get(timeout=TIMEOUT_S)
        assert steps.parent.state == "SUCCESS" and outcome(steps.parent) == kind


def test_starmap_chunks_and_map_are_refused_with_the_way_to_do_it(make_cluster: Any) -> None:
    cluster = make_cluster({"tools": TOOLS})
    _, _, tasks = build(cluster.env)
    fast = tasks["fast"]
    for make in (lambda: fast.starmap([(1,), (2,)]), lambda: fast.chunks([(1,)], 1),
                 lambda: fast.map([1, 2])):
        with pytest.raises(InvalidToolCall, match=r"past the gate; .*: group\(fast\.s\(\*\*kw"):
            make()


@pytest.fixture
def rabbitmq() -> Iterator[str]:
    """RabbitMQ's URL, with the queues these tests use deleted before and after."""
    with ExitStack() as stack:
        url = stack.enter_context(rabbitmq_queue("tool.fast"))
        for queue in ("tool.paused", "tool.crashy", "celery"):
            stack.enter_context(rabbitmq_queue(queue))
        yield url


@pytest.mark.rabbitmq
def test_chains_and_chords_with_admit_delay_and_fallback_on_rabbitmq(
    make_cluster: Any, rabbitmq: str, redis_client: redis.Redis, prefix: str
) -> None:
    cluster = make_cluster({"tools": TOOLS}, broker_url=rabbitmq, env=ENV)
    cluster.queues += ",celery"
    cluster.start(2, concurrency=2)
    _, _, tasks = build(cluster.env)
    check_chains_and_chords(tasks, redis_client, prefix, "-amqp")
    redis_client.delete(*(f"{prefix}:collected:{label}" for label in ("chain", "chord", "link")))
    check_fallbacks_in_canvases(tasks, FALLBACK_CALLS["deadline"], redis_client, prefix,
                                "deadline")

