"""`.delay()` registers its call in the background (throttle/registrar.py): the registration
may land after the gate decided the call, after a fork, at exit, or not at all (store down);
the registry must still never hold a decided call, and no registration is dropped silently."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import redis
from celery import Celery

from throttle import Action, Throttle, load_config, recovery, registrar
from throttle.keys import decided_key, registry_keys
from throttle.store import client_options

pytestmark = pytest.mark.redis

TOOLS = {"tools": {"search": {"limits": ["5/1s"], "max_delay": "30s"}}}


def make_tool(broker: str, redis_url: str, prefix: str,
              client: redis.Redis | None = None) -> tuple[Throttle, Celery]:
    app = Celery("registrar", broker=broker, backend="cache+memory://", set_as_current=False)
    throttle = (Throttle(app, load_config(TOOLS), redis_client=client, prefix=prefix)
                if client is not None else
                Throttle(app, load_config(TOOLS), redis_url, prefix=prefix))

    @throttle.tool
    def search(query: str = "") -> str:
        return query

    return throttle, app


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registrar's thread waits a minute before sending: what is queued stays queued
    until a flush."""
    monkeypatch.setattr(registrar, "LINGER_S", 60.0)


@pytest.mark.usefixtures("held")
def test_a_call_decided_before_its_registration_lands_leaves_nothing_for_the_reaper(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle, app = make_tool(redis_dbs[0], redis_url, prefix)
    admitted = app.tasks["tool.search"].delay(query="lamp")
    assert throttle.gate.registrar.queued() == 1
    assert throttle.gate.acquire("search", admitted.id).action is Action.ADMIT
    throttle.flush_registrations()  # the late registration: dropped
    calls, messages = throttle.gate.registry("search")
    assert redis_client.zcard(calls) == 0 and redis_client.hlen(messages) == 0
    decided = decided_key(prefix, "search")
    assert redis_client.zscore(decided, admitted.id) is not None
    assert redis_client.pttl(decided) > registrar.LATE_S * 1000  # outlives any late one
    assert recovery.reap(throttle, ["search"], now_s=4e9) == 0


@pytest.mark.usefixtures("held")
def test_a_call_delayed_before_its_registration_lands_is_registered_until_admitted(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle, app = make_tool(redis_dbs[0], redis_url, prefix)
    for n in range(5):
        assert throttle.gate.acquire("search", f"before-{n}").action is Action.ADMIT
    delayed = app.tasks["tool.search"].delay(query="lamp")
    assert throttle.gate.acquire("search", delayed.id).action is Action.DELAY
    throttle.flush_registrations()
    calls, _ = throttle.gate.registry("search")
    assert redis_client.zscore(calls, delayed.id) is not None  # still undecided
    assert redis_client.zscore(decided_key(prefix, "search"), delayed.id) is None


def test_a_gate_whose_calls_are_not_registered_notes_no_decided_call(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """RabbitMQ: nothing is registered, so a decision writes nothing more than before."""
    throttle, _ = make_tool("amqp://guest:guest@127.0.0.1:5672//", redis_url, prefix)
    assert throttle.gate.acquire("search", "call-1").action is Action.ADMIT
    assert not redis_client.exists(decided_key(prefix, "search"))


@pytest.mark.usefixtures("held")
def test_a_forked_child_starts_with_an_empty_queue_and_sends_its_own(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    throttle, app = make_tool(redis_dbs[0], redis_url, prefix)
    search = app.tasks["tool.search"]
    parents = search.delay(query="parent")
    assert throttle.gate.registrar.queued() == 1
    pid = os.fork()
    if pid == 0:  # the child: report through its exit code, never return into pytest
        code = 1
        try:
            empty = throttle.gate.registrar.queued() == 0  # (the child's own gate)
            childs = search.delay(query="child")
            throttle.flush_registrations()
            calls, _ = throttle.gate.registry("search")
            registered = redis_client.zrange(calls, 0, -1)
            code = 0 if empty and childs.id.encode() in registered else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    calls, _ = throttle.gate.registry("search")
    assert parents.id.encode() not in redis_client.zrange(calls, 0, -1)  # the parent's
    throttle.flush_registrations()
    assert redis_client.zcard(calls) == 2 and redis_client.zscore(calls, parents.id)


@pytest.mark.parametrize("patch", [
    "",
    "from gevent import monkey; monkey.patch_all()",
    "import eventlet; eventlet.monkey_patch()",
], ids=["threads", "gevent", "eventlet"])
def test_a_process_that_exits_right_after_delay_has_its_call_registered(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    patch: str,
) -> None:
    """The first call is sent by the registrar's thread (a greenlet when patched) while the
    caller sleeps; the second is still queued when the process exits: sent at exit."""
    script = textwrap.dedent(f"""
        {patch}
        import time, warnings
        warnings.simplefilter("ignore")
        from celery import Celery
        from throttle import Throttle, load_config
        app = Celery("exit", broker={redis_dbs[0]!r}, backend="cache+memory://")
        throttle = Throttle(app, load_config({TOOLS!r}), {redis_url!r}, prefix={prefix!r})

        @throttle.tool
        def search(query: str = "") -> str:
            return query

        print(search.delay(query="first").id)
        time.sleep(0.5)
        print(throttle.gate.registrar.queued())
        print(search.delay(query="second").id)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    first, queued, second = done.stdout.split()
    assert queued == "0"
    calls, messages = registry_keys(prefix, "search")
    for task_id in (first, second):
        assert redis_client.zscore(calls, task_id) is not None
        assert redis_client.hexists(messages, task_id)


def test_a_store_down_logs_each_call_not_registered_and_publishes_it_all_the_same(
    redis_url: str, prefix: str, redis_dbs: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    down = redis.Redis(host="127.0.0.1", port=1, **client_options(0.5))  # nothing listens
    throttle, app = make_tool(redis_dbs[0], redis_url, prefix, client=down)
    with caplog.at_level(logging.ERROR, logger="throttle"):
        sent = [app.tasks["tool.search"].delay(query=str(n)).id for n in range(3)]
        throttle.flush_registrations()
    for task_id in sent:
        assert f"call {task_id} is enqueued but not registered for recovery" in caplog.text
    broker = redis.Redis.from_url(redis_dbs[0])
    assert sum(broker.llen(key) for key in broker.scan_iter(match="tool.search*")) == 3


def test_a_full_queue_makes_the_caller_register_its_call_itself(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registrar, "MOST_QUEUED", 0)
    throttle, app = make_tool(redis_dbs[0], redis_url, prefix)
    result = app.tasks["tool.search"].delay(query="lamp")
    calls, _ = throttle.gate.registry("search")
    assert redis_client.zscore(calls, result.id) is not None  # before any flush
    assert throttle.gate.registrar.queued() == 0


def test_a_registration_queued_too_long_is_logged_not_sent(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Past LATE_S the gate's note of a decided call may have expired: sent then, the
    registration could bring a decided call back to the reaper."""
    monkeypatch.setattr(registrar, "LINGER_S", 60.0)
    monkeypatch.setattr(registrar, "LATE_S", 0.0)
    throttle, app = make_tool(redis_dbs[0], redis_url, prefix)
    with caplog.at_level(logging.ERROR, logger="throttle"):
        result = app.tasks["tool.search"].delay(query="lamp")
        throttle.flush_registrations()
    assert f"call {result.id} is enqueued but not registered for recovery" in caplog.text
    calls, _ = throttle.gate.registry("search")
    assert redis_client.zcard(calls) == 0


def test_the_decided_notes_stay_bounded_dropping_the_oldest(
    redis_url: str, redis_client: redis.Redis, prefix: str, redis_dbs: tuple[str, str]
) -> None:
    """docs/celery.md: at most 100,000 notes; a note past that pushes out the oldest."""
    throttle, _ = make_tool(redis_dbs[0], redis_url, prefix)
    decided = decided_key(prefix, "search")
    seconds, micros = redis_client.time()
    noted_ms = seconds * 1000 + micros / 1000 + 60_000  # earlier notes: they expire sooner
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, 100_000, 10_000):
        pipe.zadd(decided, {f"old-{n}": noted_ms + n / 10 for n in range(start, start + 10_000)})
    pipe.execute()
    assert throttle.gate.acquire("search", "unregistered").action is Action.ADMIT
    assert redis_client.zcard(decided) == 100_000
    assert redis_client.zscore(decided, "unregistered") is not None
    assert redis_client.zscore(decided, "old-0") is None  # the oldest note went
    assert redis_client.zscore(decided, "old-1") is not None
