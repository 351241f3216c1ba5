"""The monitoring counters: buffered in memory, flushed in one pipeline, read back exactly."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.servers import free_port
from throttle.keys import stats_key, waiting_key
from throttle.monitor import metrics
from throttle.monitor.stats import (
    RECENT_TTL_S,
    TOTALS_TTL_S,
    StatsBuffer,
    parse_totals,
    recent_keys,
    sum_recent,
)

pytestmark = [pytest.mark.redis]


def test_a_flush_writes_every_count_once_and_they_read_back_as_totals(
    redis_client: redis.Redis, prefix: str,
) -> None:
    buffer = StatsBuffer(prefix)
    now = time.time()
    for wait_s in (0.01, 0.3, 0.3, 400.0):
        buffer.add_decision("search", "delay", "reserved", wait_s, now)
    for _ in range(3):
        buffer.add_decision("search", "admit", "admitted", 0.0, now)
    buffer.add_decision("search", "fallback", "deadline", 0.0, now)
    buffer.add_run("search", "success", 0.02, now)
    buffer.add_run("search", "error", 7.0, now)
    buffer.add_store_error("search")
    assert buffer.flush(redis_client) > 0
    assert buffer.flush(redis_client) == 0  # nothing left: a second flush writes nothing

    totals = parse_totals(redis_client.hgetall(stats_key(prefix, "search")))
    assert totals.decisions == {"delay": {"reserved": 4}, "admit": {"admitted": 3},
                                "fallback": {"deadline": 1}}
    assert totals.delay is not None
    assert totals.delay.count == 4 and totals.delay.total == pytest.approx(400.61)
    cumulative = dict(totals.delay.cumulative())
    assert (cumulative["0.05"], cumulative["0.5"], cumulative["300"], cumulative["+Inf"]) == \
        (1, 3, 3, 4)
    assert set(totals.runs) == {"success", "error"}
    assert dict(totals.runs["error"].cumulative())["5"] == 0
    assert dict(totals.runs["error"].cumulative())["10"] == 1
    assert totals.store_errors == 1

    recent = [redis_client.hgetall(key) for key in recent_keys(prefix, "search", now)]
    assert sum_recent(recent) == pytest.approx({
        "admit": 3, "delay": 4, "fallback": 1, "delayed_calls": 0, "arrived": 0,
        "body:sum": 7.02, "body:count": 2})
    ttl = redis_client.ttl(recent_keys(prefix, "search", now)[0])
    assert 0 < ttl <= RECENT_TTL_S
    assert RECENT_TTL_S < redis_client.ttl(stats_key(prefix, "search")) <= TOTALS_TTL_S


def test_a_call_waits_from_its_delay_until_its_next_decision_whichever_process_makes_it(
    redis_client: redis.Redis, prefix: str,
) -> None:
    first, second = StatsBuffer(prefix), StatsBuffer(prefix)  # two worker processes
    now = time.time()
    first.add_decision("search", "delay", "reserved", 30.0, now, call_id="a", delays_before=0)
    first.add_decision("search", "delay", "pool", 5.0, now, call_id="b", delays_before=0)
    first.add_decision("search", "admit", "admitted", 0.0, now, call_id="c", delays_before=0)
    first.flush(redis_client)
    assert redis_client.zrange(waiting_key(prefix, "search", "reserved"), 0, -1) == [b"a"]
    assert redis_client.zscore(waiting_key(prefix, "search", "pool"), "b") == \
        pytest.approx((now + 5.0) * 1000)
    # b comes back to the other process, is delayed again for the tool; a is admitted.
    second.add_decision("search", "delay", "reserved", 10.0, now, call_id="b", delays_before=1)
    second.add_decision("search", "admit", "reservation", 0.0, now, call_id="a", delays_before=1)
    second.flush(redis_client)
    assert redis_client.zrange(waiting_key(prefix, "search", "reserved"), 0, -1) == [b"b"]
    assert redis_client.zcard(waiting_key(prefix, "search", "pool")) == 0

    totals = parse_totals(redis_client.hgetall(stats_key(prefix, "search")))
    assert totals.delayed_calls == {"reserved": 1, "pool": 1}  # calls, by their first delay
    assert totals.outcome("delay") == 3  # decisions
    recent = sum_recent([redis_client.hgetall(k) for k in recent_keys(prefix, "search", now)])
    assert (recent["arrived"], recent["delayed_calls"], recent["delay"]) == (3, 2, 3)


def test_a_delay_flushed_after_its_next_decision_leaves_no_waiting_entry(
    redis_client: redis.Redis, prefix: str,
) -> None:
    """Two processes flush in either order: the one that parked a call last, or the one that
    admitted it when it came back first; the call waits from its delay to that decision."""
    parker, admitter = StatsBuffer(prefix), StatsBuffer(prefix)
    now = time.time()
    parker.add_decision("search", "delay", "parked", 0.2, now, call_id="a", delays_before=0)
    admitter.add_decision("search", "admit", "admitted", 0.0, now + 0.2, call_id="a",
                          delays_before=1)
    admitter.flush(redis_client)  # the admission lands first ...
    parker.flush(redis_client)  # ... then the park it ended
    assert redis_client.zcard(waiting_key(prefix, "search", "parked")) == 0
    # Parked again after that admission's decision (a second delay): it waits again.
    parker.add_decision("search", "delay", "parked", 0.2, now, call_id="b", delays_before=0)
    parker.flush(redis_client)
    admitter.add_decision("search", "delay", "parked", 0.3, now + 0.2, call_id="b",
                          delays_before=1)
    admitter.flush(redis_client)
    assert redis_client.zrange(waiting_key(prefix, "search", "parked"), 0, -1) == [b"b"]


def test_counts_survive_a_failed_flush_and_are_written_once_later(
    redis_client: redis.Redis, prefix: str,
) -> None:
    buffer = StatsBuffer(prefix)
    buffer.add_decision("search", "admit", "admitted", 0.0, time.time())
    down = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.RedisError):
        buffer.flush(down)
    buffer.add_decision("search", "admit", "admitted", 0.0, time.time())
    buffer.flush(redis_client)
    totals = parse_totals(redis_client.hgetall(stats_key(prefix, "search")))
    assert totals.outcome("admit") == 2


class HeldClient:
    """A real Redis client whose first pipeline waits for `release` before it executes."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.writing, self.release = threading.Event(), threading.Event()

    def pipeline(self, transaction: bool = False) -> Any:
        pipe = self.client.pipeline(transaction=transaction)
        if not self.writing.is_set():
            execute = pipe.execute

            def held() -> Any:
                self.writing.set()
                self.release.wait(10)
                return execute()

            pipe.execute = held  # type: ignore[method-assign]
        return pipe


class Owner:
    """What the hooks read of a tool's `Throttle`: its prefix and its gate's client."""

    def __init__(self, prefix: str, client: HeldClient) -> None:
        self.prefix, self.gate = prefix, SimpleNamespace(client=client)


def test_a_flush_returns_once_the_counts_a_flush_under_way_took_have_landed(
    redis_client: redis.Redis, prefix: str,
) -> None:
    # A test deletes its prefix right after flush(): a flush still writing then (the
    # process's flusher thread) would leave its keys behind.
    client = HeldClient(redis_client)
    owner = Owner(prefix, client)
    task = SimpleNamespace(tool=SimpleNamespace(name="search"), throttle=owner)
    metrics.observe_run(task, "success", 0.1)  # type: ignore[arg-type]
    under_way = threading.Thread(target=metrics.flush)
    under_way.start()
    assert client.writing.wait(5)  # a flush (this one or the flusher's) took the count
    later = threading.Thread(target=metrics.flush)
    later.start()
    later.join(0.5)
    waited = later.is_alive()
    client.release.set()
    under_way.join(10)
    later.join(10)
    assert waited, "flush() returned while another flush was still writing"
    totals = parse_totals(redis_client.hgetall(stats_key(prefix, "search")))
    assert totals.runs["success"].count == 1


def test_the_hooks_never_raise_into_a_task_and_say_what_they_could_not_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        """Not a task: every attribute the hooks read is missing."""

    caplog.set_level(logging.DEBUG, logger="throttle.monitor.metrics")
    metrics.observe_decision(Broken(), "admit", "admitted", 0.0)
    metrics.observe_run(Broken(), "success", 0.1)
    metrics.observe_store_error(Broken())
    ours = [record for record in caplog.records if record.name == "throttle.monitor.metrics"]
    said = [record.getMessage() for record in ours]
    assert [message.split(" of ")[0] for message in said] == [
        "could not count a decision", "could not count a run", "could not count a store error",
    ]
    assert all(record.exc_info for record in ours)


def test_stats_keys_stand_apart_from_every_gate_key() -> None:
    from throttle.keys import recent_stats_key, tool_keys

    gate = tool_keys("p", "stats", pool="stats").as_list() + tool_keys("p", "stats").as_list()
    ours = [stats_key("p", "stats"), recent_stats_key("p", "stats", 1_800_000_000)]
    assert all(key.startswith("p:stats:{stats}") for key in ours)
    assert not any(key.startswith("p:stats:") for key in gate)


@pytest.mark.parametrize(("header", "expected"), [
    (None, 0), (0, 0), (3, 3), ("2", 2), ("lots", None), (-1, None), (True, None),
    ([1], None), (10**12, None),
])
def test_a_hand_made_delay_count_header_is_read_as_a_count_or_ignored(
    header: object, expected: int | None,
) -> None:
    request = SimpleNamespace(id="call-1", throttle_delays=header)
    assert metrics._delays_before(request) == expected
