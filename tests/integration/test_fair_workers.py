"""Fair sharing on real `celery worker` processes: one tenant's flood does not hold up another.

Tool 10/1s shared by `tenant`. Tenant A enqueues 60 calls, tenant B 5 right behind them. In
arrival order (FIFO) B would run after A's backlog, ~6 s out; shared fairly B's 5 calls take
half the rate: about 1 s, plus the window A holds and the horizon. Times are the gate's own
(each admission's Redis time, as the worker logged it).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from tests.apps.ledger import build
from tests.integration.test_celery_flow import RESULT
from tests.support.workers import await_outcomes, ledger
from throttle import load_config
from throttle.monitor.exporter import gauges
from throttle.monitor.snapshot import read_snapshot
from throttle.monitor.status_tables import tenant_lines
from throttle.windows import most_in_window

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

PARAMS = {"type": "object", "properties": {"n": {"type": "integer"},
                                           "tenant": {"type": "string"}},
          "required": ["n", "tenant"], "additionalProperties": False}
FLOOD, QUIET = 60, 5
# B's fair share (5 calls at 5/s) + the window A holds + the horizon (0.5 s) + the time to
# pass A's 60 messages in the broker and the workers' lateness.
B_BOUND_S = 1.0 + 1.0 + 0.5 + 1.0


def test_a_quiet_tenant_runs_within_its_fair_share_of_a_flood_on_real_workers(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    tool = {"limits": ["10/1s"], "max_delay": "30s", "params": PARAMS, "result": RESULT,
            "fallback": {"n": -1}, "fair_by": "tenant"}
    cluster = make_cluster({"tools": {"shared": tool}})
    cluster.start(2, concurrency=2)
    _, _, tasks = build(cluster.env)
    shared = tasks["shared"]
    shared.delay(n=-2, tenant="warm-up").get(timeout=30)  # every node has connected
    sent_s = redis_time(redis_client)
    results = [shared.delay(n=n, tenant="a") for n in range(FLOOD)]
    results += [shared.delay(n=FLOOD + n, tenant="b") for n in range(QUIET)]
    ended = await_outcomes(results, timeout_s=60)
    assert ended["result"] == FLOOD + QUIET, ended

    runs = [run for run in ledger(redis_client, prefix) if run["n"] >= 0]
    admitted = [run["admitted_at"] for run in runs]
    assert most_in_window(admitted, 1.0) <= 10
    b_waits = sorted(run["admitted_at"] - sent_s for run in runs if run["n"] >= FLOOD)
    a_last = max(run["admitted_at"] - sent_s for run in runs if run["n"] < FLOOD)
    print(f"\nB's waits (s): {[round(w, 2) for w in b_waits]}; A's last: {a_last:.2f} s; "
          f"delays per call: {max(run['delays'] for run in runs)} at most")
    assert b_waits[-1] <= B_BOUND_S, b_waits
    # Work-conserving: A's 60 calls take the limit's rate (6 windows), not much more.
    assert a_last <= FLOOD / 10 + 1.5

    # `throttle status` and the exporter read the tenants the workers counted (flushed
    # every second): A and B with their admissions, B's mean wait well under A's.
    time.sleep(1.5)
    snapshot = read_snapshot(redis_client, load_config({"tools": {"shared": tool}}), prefix)
    view = next(v for v in snapshot.tools if v.tool.name == "shared")
    uses = {use.tenant: use for use in view.tenants}
    assert (uses["a"].admitted, uses["b"].admitted) == (FLOOD, QUIET), view.tenants
    assert uses["b"].mean_wait_s < uses["a"].mean_wait_s
    line = str(tenant_lines(snapshot)[0])
    assert line.startswith("shared: shared fairly by 'tenant'; parked 0;"), line
    assert "a 60 (wait" in line
    families = {family.name: family for family in gauges(snapshot)}
    admitted = {sample.labels["tenant"]: sample.value
                for sample in families["throttle_tenant_admitted_last_minute"].samples
                if sample.labels["tool"] == "shared"}
    assert (admitted["a"], admitted["b"]) == (FLOOD, QUIET), admitted
    waits = {sample.labels["tenant"]: sample.value
             for sample in families["throttle_tenant_wait_seconds_mean"].samples}
    assert waits["b"] < waits["a"], waits


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6
