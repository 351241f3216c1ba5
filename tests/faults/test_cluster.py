"""10,000 per-key limits on a Redis Cluster of 3 primaries started on loopback by the test.

The gate runs over `redis.cluster.RedisCluster`: every decision's keys share one hash tag, so
each EVALSHA goes to one node (the client refuses, and a node answers CROSSSLOT to, keys of
several slots); scripts are loaded on the node that answers NOSCRIPT. 3 processes decide one
call each of every tenant, in the same order, at a limit of 1/60s per tenant with a 90 s
max_delay: each tenant must get exactly one admission, one reservation a window later and
one fallback, whichever process asked first. A `redis+cluster://` URL serves the gate, the
monitoring commands and real Celery workers.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.cluster
from celery import Celery
from redis.crc import key_slot

from tests.integration.test_celery_flow import burst, tool
from tests.support.servers import RedisServer, free_port, redis_cluster
from tests.support.workers import check_ledger
from throttle import Action, AsyncGate, Gate, StoreUnavailable, Throttle, load_config, recovery
from throttle.keys import redelivery_key, tool_keys
from throttle.monitor.exporter import ThrottleCollector
from throttle.monitor.snapshot import read_snapshot
from throttle.monitor.sources import Sources

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

PREFIX = "throttle"
TENANTS, CALLERS = 10_000, 3
WINDOW_S = 60.0
CONFIG = {
    "pools": {"llm": {"limits": ["50/1m"], "shares": {"high": 1.0, "low": 0.5}}},
    "tools": {
        "per_tenant": {"limits": ["1/60s"], "max_delay": "90s", "key": "tenant"},
        "pooled": {
            "limits": ["1/60s"], "max_delay": "90s", "key": "tenant", "pool": "llm",
            "priority": "low",
        },
        "capped": {"limits": ["1/60s"], "max_delay": "90s", "key": "tenant", "concurrency": 5},
    },
}

Answer = tuple[int, str, str, float]  # tenant, action, reason, slot_at


def tenant(i: int) -> str:
    return f"tenant-{i}"


def _decide_all(job: tuple[int, int, float]) -> tuple[list[Answer], Counter[str]]:
    """One caller: one call of every tenant, in order. Returns answers and errors by type."""
    port, caller, start_at = job
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=port)
    gate = Gate(client, load_config(CONFIG), prefix=PREFIX)
    time.sleep(max(0.0, start_at - time.time()))
    answers: list[Answer] = []
    errors: Counter[str] = Counter()
    for i in range(TENANTS):
        try:
            decision = gate.acquire("per_tenant", f"{tenant(i)}/{caller}", key=tenant(i))
        except Exception as exc:
            errors[type(exc).__name__] += 1
            continue
        answers.append((i, decision.action.value, decision.reason, decision.slot_at))
    client.close()
    return answers, errors


@pytest.fixture(scope="module")
def cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    with redis_cluster(Path(tmp_path_factory.mktemp("cluster"))) as nodes:
        yield nodes


def test_every_decision_keeps_its_keys_in_one_slot(cluster_nodes: list[RedisServer]) -> None:
    config = load_config(CONFIG)
    for i in range(TENANTS):
        for name, configured in config.tools.items():
            keys = tool_keys(PREFIX, name, tenant(i), pool=configured.pool,
                             concurrency=configured.concurrency is not None)
            names = [*keys.as_list(), redelivery_key(keys, "some-task-id")]
            assert len({key_slot(key.encode()) for key in names}) == 1, names


def test_10000_per_key_limits_on_a_3_primary_cluster_hold_exactly_without_crossslot(
    cluster_nodes: list[RedisServer],
) -> None:
    port = cluster_nodes[0].port
    start_at = time.time() + 3  # spawned processes import for a while; then all start at once
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(CALLERS) as pool:
        shares = pool.map(_decide_all, [(port, n, start_at) for n in range(CALLERS)], chunksize=1)
    elapsed = time.monotonic() - started
    errors = sum((errs for _, errs in shares), Counter[str]())
    by_tenant: dict[int, list[Answer]] = defaultdict(list)
    for answers, _ in shares:
        for answer in answers:
            by_tenant[answer[0]].append(answer)

    inexact = 0
    for answers in by_tenant.values():
        actions = sorted(action for _, action, _, _ in answers)
        admitted = [slot for _, action, _, slot in answers if action == Action.ADMIT]
        reserved = [slot for _, action, _, slot in answers if action == Action.DELAY]
        inexact += actions != ["admit", "delay", "fallback"] or (
            reserved[0] - admitted[0] < WINDOW_S
        )
    per_node = [node.client().dbsize() for node in cluster_nodes]
    print(
        f"\n{TENANTS:,} per-key limits x {CALLERS} callers on a {len(cluster_nodes)}-primary "
        f"cluster in {elapsed:.1f} s: errors {dict(errors) or 0} (CROSSSLOT "
        f"{errors['ResponseError'] + errors['RedisClusterException']}), tenants not exactly "
        f"admit/reserve/fallback {inexact}, keys per node {per_node}"
    )
    assert not errors
    assert len(by_tenant) == TENANTS and inexact == 0
    assert min(per_node) > 0.2 * sum(per_node)


def test_pools_leases_and_the_other_gate_calls_work_on_the_cluster(
    cluster_nodes: list[RedisServer],
) -> None:
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster_nodes[1].port)
    gate = Gate(client, load_config(CONFIG), prefix=f"{PREFIX}-ops")
    actions: Counter[str] = Counter()
    for i in range(200):
        for name in ("pooled", "capped"):
            actions[gate.acquire(name, f"{name}-{i}", key=tenant(i)).action.value] += 1
            gate.finish(name, f"{name}-{i}", key=tenant(i))
    gate.note_redelivery("capped", "capped-0", key=tenant(0))
    gate.settle("pooled", "pooled-0", 2, key=tenant(0))
    gate.release("per_tenant", "none", key=tenant(0))
    gate.cool_down("per_tenant", 1, key=tenant(0))
    client.script_flush()  # on every primary: each reloads the script on NOSCRIPT
    after_flush = gate.acquire("per_tenant", "after-flush", key=tenant(1))

    async def async_decisions() -> tuple[list[Action], list[bool]]:
        async_client = redis.asyncio.cluster.RedisCluster(
            host="127.0.0.1", port=cluster_nodes[2].port
        )
        agate = AsyncGate(async_client, load_config(CONFIG), prefix=f"{PREFIX}-async")
        try:
            decided = [
                (await agate.acquire("per_tenant", f"a{i}", key=tenant(i % 50))).action
                for i in range(100)
            ]
            settled = await asyncio.gather(
                agate.settle("per_tenant", "a0", 2, key=tenant(0)),
                agate.settle("per_tenant", "a1", 2, key=tenant(1), wait_s=0.01),
                agate.settle("per_tenant", "never", 2, key=tenant(2)),
            )
            return decided, list(settled)
        finally:
            await async_client.aclose()

    decided, settled = asyncio.run(async_decisions())
    async_actions = Counter(action.value for action in decided)
    print(
        f"\npool and concurrency cap on the cluster: {dict(actions)} of 400; after SCRIPT "
        f"FLUSH: {after_flush.action.value}; asyncio cluster client: {dict(async_actions)}"
    )
    assert actions["admit"] == 200 + 25  # every capped call; the pool's low share is 25/50
    assert after_flush.action is Action.ADMIT
    assert async_actions == {"admit": 50, "delay": 50}
    assert settled == [True, True, False]  # settles on several nodes, each its own answer
    client.close()



def test_background_registrations_of_several_tools_reach_the_cluster_in_one_flush(
    cluster_nodes: list[RedisServer],
) -> None:
    """The registrar's batch spans the tools' slots (redis-py's cluster pipeline splits it),
    loads the script where a node answers NOSCRIPT, and a pooled call decided before its
    registration arrives is noted under the pool's tag, so the late one is dropped."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster_nodes[0].port)
    gate = Gate(client, load_config(CONFIG), prefix=f"{PREFIX}-reg", registers_calls=True)
    names = ("per_tenant", "pooled", "capped")
    assert gate.acquire("pooled", "decided", key=tenant(1)).action is Action.ADMIT
    client.script_flush()
    check_at = time.time() + 60
    for name in names:
        for i in range(5):
            assert gate.register_later(name, f"{name}-{i}", "{}", check_at)
    assert gate.register_later("pooled", "decided", "{}", check_at)
    gate.flush_registrations()
    for name in names:
        calls, messages = gate.registry(name)
        assert client.zcard(calls) == 5 and client.hlen(messages) == 5, name
    assert client.zscore(gate.registry("pooled")[0], "decided") is None
    client.close()


def test_a_cluster_url_serves_the_gate_status_and_the_exporter(
    cluster_nodes: list[RedisServer],
) -> None:
    """`redis+cluster://host:port` (THROTTLE_REDIS_URL) reaches the cluster through one node:
    the gate (sync and asyncio), `throttle status`'s snapshot and the exporter all work."""
    url = f"redis+cluster://127.0.0.1:{cluster_nodes[0].port}"
    prefix = f"{PREFIX}-url"
    config = load_config({"tools": {
        "search": {"limits": ["3/60s"], "max_delay": "90s"},
        "orders": {"limits": ["3/60s"], "max_delay": "90s"},
    }})
    gate = Gate(url, config, prefix=prefix)
    assert isinstance(gate.client, redis.cluster.RedisCluster)
    searches = [gate.acquire("search", f"s{i}").action for i in range(5)]

    async def async_orders() -> list[Action]:
        agate = AsyncGate(url, config, prefix=prefix)
        try:
            return [(await agate.acquire("orders", f"o{i}")).action for i in range(4)]
        finally:
            await agate.client.aclose()

    orders = asyncio.run(async_orders())
    sources = Sources(redis_url=url, broker_url="memory://", prefix=prefix, config=config)
    snapshot = read_snapshot(sources.redis(), config, prefix)
    used = {view.tool.name: (view.shortest.used if view.shortest else None, view.reserved)
            for view in snapshot.tools}
    scraped = {metric.name: metric.samples for metric in ThrottleCollector(sources, None).collect()}
    in_window = {s.labels["tool_name"]: s.value for s in scraped["tool_requests_in_window"]}
    print(f"\ncluster URL: search {Counter(a.value for a in searches)}, orders (asyncio) "
          f"{Counter(a.value for a in orders)}; status (used, reserved) {used}; exporter "
          f"in window {in_window}")
    assert searches == [Action.ADMIT] * 3 + [Action.DELAY] * 2
    assert orders == [Action.ADMIT] * 3 + [Action.DELAY]
    assert used == {"search": (3, 2), "orders": (3, 1)}
    assert scraped["throttle_exporter_redis_up"][0].value == 1
    assert in_window == {"search": 3, "orders": 3}
    gate.client.close()


def test_an_unreachable_cluster_url_is_a_store_error_with_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable, match="check that Redis runs and that THROTTLE_REDIS_URL"):
        Gate(url, load_config(CONFIG), socket_timeout_s=0.5)
    # A worker's reaper only warns (and tries again next second): it never stops the worker.
    throttle = Throttle(Celery("unreachable", broker="memory://", set_as_current=False),
                        load_config(CONFIG), url)
    with caplog.at_level(logging.WARNING, logger="throttle"):
        assert recovery.reap(throttle, ["per_tenant"]) == 0
    assert "lost calls not checked" in caplog.text


@pytest.mark.celery
def test_celery_workers_keep_a_limit_on_the_cluster_by_url(
    cluster_nodes: list[RedisServer], make_cluster: Any, redis_url: str,
    redis_client: redis.Redis, prefix: str,
) -> None:
    """Two worker nodes whose gate is `redis+cluster://`: 120 calls at 20/1s all run, no
    window holds more than 20 (the ledger stays on the suite's private Redis)."""
    url = f"redis+cluster://127.0.0.1:{cluster_nodes[1].port}"
    workers = make_cluster({"tools": {"clustered": tool(["20/1s"], "30s")}},
                           env={"THROTTLE_REDIS_URL": url, "THROTTLE_TEST_LEDGER_URL": redis_url})
    results, _ = burst(workers, "clustered", 120)
    workers.start(2, concurrency=2)
    check = check_ledger(results, redis_client, prefix, window_s=1.0, timeout_s=40)
    print(f"\ncelery workers, gate on the cluster by URL: {check}/20")
    assert check.ended == {"result": 120} and check.run_twice == 0
    assert check.most <= 20
