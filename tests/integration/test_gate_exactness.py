"""Exactness under real concurrency: 4 processes x 8 threads hit one key of the real Redis.

Every burst is 200 simultaneous calls of a tool limited to 5/60s. The gate must admit exactly
5, reserve the other 195, and place the reservations so that no 60 s half-open window ever
holds more than 5 slots, with no capacity wasted (each group of 5 starts exactly one window
after the previous one; with a slot margin, one window plus the margin). Each scenario runs 20
times on fresh prefixes, reusing one pool of spawned processes (each with its own redis
client) so the whole file takes a few seconds.
"""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from multiprocessing.pool import Pool
from typing import Any

import pytest
import redis

from tests.support.reservations import reservations
from throttle import Action, Gate, load_config
from throttle.keys import tool_keys

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROCESSES = 4
THREADS = 8
CALLS = 200
MAX, WINDOW_S, GAP_S = 5, 60.0, 12.0
REPETITIONS = 20
EPSILON_S = 1e-6
MILLISECOND = 1e-3
CONFIG = {
    "broker": {"visibility_timeout": "2h"},
    "tools": {
        "burst": {"limits": ["5/60s"], "max_delay": "1h", "slot_margin": "0ms"},
        "burst_margin": {"limits": ["5/60s"], "max_delay": "1h"},  # the default margin
        "burst_even": {
            "limits": ["5/60s"],
            "max_delay": "1h",
            "pace": "even",
            "slot_margin": "0ms",
        },
        "burst_even_margin": {"limits": ["5/60s"], "max_delay": "1h", "pace": "even"},
    },
}


def margin_s(tool: str) -> float:
    return load_config(CONFIG).tool(tool).slot_margin_ms / 1000


_barrier: Any = None
_client: redis.Redis | None = None


def _start_process(barrier: Any, url: str) -> None:
    """Pool initializer: each process gets its own redis client and the shared barrier."""
    global _barrier, _client
    _barrier, _client = barrier, redis.Redis.from_url(url)


def _burst(job: tuple[str, str, int]) -> list[tuple[str, str, float, float, str]]:
    """One process's share of a burst: 8 threads, released together with the other processes."""
    prefix, tool, process_index = job
    assert _client is not None
    gate = Gate(_client, load_config(CONFIG), prefix=prefix)
    # The last thread of this process to arrive waits for the other processes; then all
    # 8 threads here (and 24 elsewhere) start at once.
    local = threading.Barrier(THREADS, action=lambda: _barrier.wait(timeout=60))
    answers: list[tuple[str, str, float, float, str]] = []
    lock = threading.Lock()

    def run(thread_index: int) -> None:
        slot = process_index * THREADS + thread_index
        members = [f"call-{n}" for n in range(slot, CALLS, PROCESSES * THREADS)]
        local.wait(timeout=60)
        for member in members:
            decision = gate.acquire(tool, member)
            with lock:
                answers.append(
                    (
                        member,
                        decision.action.value,
                        decision.wait_s,
                        decision.slot_at,
                        decision.reason,
                    )
                )

    threads = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[Pool]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    with context.Pool(
        PROCESSES, initializer=_start_process, initargs=(barrier, redis_url)
    ) as procs:
        yield procs


def run_burst(pool: Pool, prefix: str, tool: str) -> list[tuple[str, str, float, float, str]]:
    """200 simultaneous acquires of `tool` under `prefix`, from 4 processes x 8 threads."""
    # A process blocks on the barrier until all four have a job, so each job gets its own process.
    shares = pool.map(_burst, [(prefix, tool, n) for n in range(PROCESSES)], chunksize=1)
    answers = [answer for share in shares for answer in share]
    assert sorted(member for member, *_ in answers) == sorted(f"call-{n}" for n in range(CALLS))
    return answers


def assert_no_window_holds_more_than_max(slots: list[float]) -> None:
    slots = sorted(slots)
    for i in range(len(slots) - MAX):
        assert slots[i + MAX] - slots[i] >= WINDOW_S - EPSILON_S, (i, slots[i : i + MAX + 1])


@pytest.mark.parametrize("tool", ["burst", "burst_margin"])
def test_200_simultaneous_calls_admit_exactly_5_and_reserve_the_rest_window_by_window(
    pool: Pool, redis_client: redis.Redis, prefix: str, tool: str
) -> None:
    spacing_s = WINDOW_S + margin_s(tool)
    for repetition in range(REPETITIONS):
        run_prefix = f"{prefix}:r{repetition}-{uuid.uuid4().hex[:6]}"
        answers = run_burst(pool, run_prefix, tool)

        actions = [action for _, action, *_ in answers]
        assert actions.count(Action.ADMIT) == MAX
        assert actions.count(Action.DELAY) == CALLS - MAX
        admitted = sorted(slot for _, action, _, slot, _ in answers if action == Action.ADMIT)
        slots = sorted(slot for *_, slot, _ in answers)
        assert slots[:MAX] == admitted, "the admitted calls hold the earliest slots"
        assert {reason for *_, reason in answers} == {"admitted", "reserved"}

        assert_no_window_holds_more_than_max(slots)
        firsts = slots[::MAX]
        for k in range(1, len(firsts)):
            assert firsts[k] - firsts[k - 1] == pytest.approx(spacing_s, abs=MILLISECOND), k
        # Every slot is one window after the slot 5 places before it: no capacity is wasted.
        for i in range(MAX, CALLS):
            assert slots[i] - slots[i - MAX] == pytest.approx(spacing_s, abs=MILLISECOND), i

        keys = tool_keys(run_prefix, tool)
        assert redis_client.zcard(keys.log) == CALLS
        assert len(reservations(redis_client, keys)) == CALLS - MAX


@pytest.mark.parametrize("tool", ["burst_even", "burst_even_margin"])
def test_200_simultaneous_calls_with_even_pace_get_distinct_slots_12_seconds_apart(
    pool: Pool, redis_client: redis.Redis, prefix: str, tool: str
) -> None:
    margin = margin_s(tool)
    for repetition in range(REPETITIONS):
        run_prefix = f"{prefix}:e{repetition}-{uuid.uuid4().hex[:6]}"
        answers = run_burst(pool, run_prefix, tool)

        admitted = sorted(slot for _, action, _, slot, _ in answers if action == Action.ADMIT)
        delayed = sorted(slot for _, action, _, slot, _ in answers if action == Action.DELAY)
        assert len(admitted) == MAX
        assert len(delayed) == CALLS - MAX
        assert len(set(delayed)) == len(delayed), "delayed slots are distinct"

        assert delayed[0] - admitted[0] == pytest.approx(WINDOW_S + margin, abs=MILLISECOND)
        for i in range(1, len(delayed)):
            gap = delayed[i] - delayed[i - 1]
            if margin == 0:
                assert gap == pytest.approx(GAP_S, abs=MILLISECOND), i
            else:  # a margin can stretch one gap in five by up to the margin
                assert GAP_S - MILLISECOND <= gap <= GAP_S + margin + MILLISECOND, i
        assert_no_window_holds_more_than_max(admitted + delayed)
        assert len(reservations(redis_client, tool_keys(run_prefix, tool))) == CALLS - MAX
