"""A gate keeps one connection at hand between decisions (`scripts.Lane`): it answers each
call its own answer after an interrupted call, a server restart and a fork (real Redis)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.servers import private_redis
from throttle import Action, Gate, load_config
from throttle.scripts import load_script

pytestmark = pytest.mark.redis

CONFIG = {
    "tools": {
        "open": {"limits": ["100000/60s"], "max_delay": "1h"},  # always admits
        "one": {"limits": ["1/60s"], "max_delay": "1h"},  # admits once, then delays
    },
    "broker": {"visibility_timeout": "2h"},
}


class Interrupted(Exception):
    """Raised into a call from a signal handler, as Celery's soft time limit is."""


def pool_of(gate: Gate) -> Any:
    return gate.client.connection_pool


def test_one_call_at_a_time_uses_one_connection_kept_between_decisions(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    # Loaded beforehand: a NOSCRIPT answer (another test flushed the scripts) would load it
    # through the pool, a second connection the count below is not about.
    redis_client.script_load(load_script("acquire"))
    gate = Gate(redis_url, load_config(CONFIG), prefix=prefix)
    try:
        decisions = [gate.acquire("open", f"m{i}") for i in range(50)]
        assert {d.action for d in decisions} == {Action.ADMIT}
        assert len(pool_of(gate)._in_use_connections) == 1  # the one kept
        assert len(pool_of(gate)._available_connections) == 0
        gate.release("open", "m0")  # other commands take pooled connections as before
    finally:
        gate.close()
    assert len(pool_of(gate)._in_use_connections) == 0  # given back before the pool closed


def test_a_caller_s_own_client_keeps_no_connection(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    gate = Gate(client, load_config(CONFIG), prefix=prefix)
    gate.acquire("open", "m1")
    assert len(client.connection_pool._in_use_connections) == 0
    client.close()


def test_a_call_interrupted_mid_answer_leaves_no_answer_for_the_next_call(
    tmp_path: Path,
) -> None:
    with private_redis(tmp_path) as server:
        gate = Gate(server.url(), load_config(CONFIG), prefix="lane")
        admin = server.client()
        assert gate.acquire("one", "first").action is Action.ADMIT
        # The server stops answering; the call waiting for its answer is interrupted.
        admin.execute_command("CLIENT", "PAUSE", 800, "ALL")

        def interrupt(*_: Any) -> None:
            raise Interrupted

        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                gate.acquire("open", "interrupted")  # its answer (ADMIT) comes later
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        time.sleep(1.0)  # the pause ends and the server answers the interrupted call
        # The next call reads its own answer, not the interrupted call's ADMIT.
        assert gate.acquire("one", "second").action is Action.DELAY
        assert gate.acquire("open", "third").action is Action.ADMIT
        gate.close()


def test_a_server_restarted_between_decisions_is_reached_again(tmp_path: Path) -> None:
    with private_redis(tmp_path) as server:
        gate = Gate(server.url(), load_config(CONFIG), prefix="lane")
        assert gate.acquire("one", "before").action is Action.ADMIT
        server.restart(hard=True)  # the kept connection's socket is dead now
        assert gate.acquire("one", "after").action is Action.ADMIT  # (the log went with it)
        assert gate.acquire("one", "again").action is Action.DELAY
        gate.close()


def test_forked_children_decide_beside_their_parent_on_connections_of_their_own(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    gate = Gate(redis_url, load_config(CONFIG), prefix=prefix)
    gate.acquire("open", "parent-0")  # the parent now keeps a connection
    children = []
    for child in range(4):
        pid = os.fork()
        if pid == 0:  # the child: its answers must be its own
            code = 0
            try:
                for i in range(200):
                    decision = gate.acquire("open", f"child{child}-{i}")
                    slot = decision.slot_at * 1000
                    score = redis_client.zscore(f"{prefix}:{{open}}:log", f"child{child}-{i}")
                    if decision.action is not Action.ADMIT or score is None or (
                            abs(score - slot) > 1):
                        code = 1
            except BaseException:  # any failure is the child's exit code
                code = 2
            os._exit(code)
        children.append(pid)
    for i in range(200):  # the parent decides at the same time, on its kept connection
        decision = gate.acquire("open", f"parent-{i + 1}")
        score = redis_client.zscore(f"{prefix}:{{open}}:log", f"parent-{i + 1}")
        assert decision.action is Action.ADMIT
        assert score is not None and abs(score - decision.slot_at * 1000) <= 1
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0, 0, 0]
    assert redis_client.zcard(f"{prefix}:{{open}}:log") == 1 + 200 + 4 * 200
    gate.close()
