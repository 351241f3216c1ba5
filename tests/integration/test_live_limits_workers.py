"""Live limits on real `celery worker` processes: a limit raised and then lowered in the
middle of a steady stream of calls applies on every worker at once, with no restart.

Times are the gate's own: each admission's Redis time (`throttle_admitted_at`, what the
gate logged) and Redis TIME read around each change.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from tests.apps.ledger import build
from tests.integration.test_celery_flow import tool
from tests.support.workers import await_outcomes, ledger
from throttle import load_config
from throttle.live_defaults import REFRESH_S
from throttle.overrides import parse_limits, set_override
from throttle.windows import most_in_window

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

RATE_PER_S = 25
PHASE_S = 2.5


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def _counts_in_trailing_second(admitted: list[float], among: list[float]) -> list[int]:
    """For each admission in `among`: the admissions in the second up to and including it."""
    return [sum(1 for a in admitted if t - 1.0 < a <= t) for t in among]


KEYED_PARAMS = {"type": "object", "required": ["n", "tenant"], "additionalProperties": False,
                "properties": {"n": {"type": "integer"}, "tenant": {"type": "string"}}}


@pytest.mark.parametrize(
    "kind",
    [
        # The script reads the tool's override in the same call: no lag at all.
        pytest.param("tool", id="read-by-the-script"),
        # A per-key tool's default: each gate's cache, checked every REFRESH_S.
        pytest.param("per-key default", id="cached-per-key-default"),
    ],
)
def test_a_limit_raised_then_lowered_mid_stream_applies_on_every_worker_within_1s(
    make_cluster: Any, redis_client: redis.Redis, prefix: str, kind: str
) -> None:
    keyed = kind == "per-key default"
    extra = {"key": "tenant", "params": KEYED_PARAMS} if keyed else {}
    config = {"tools": {"live": tool(["10/1s"], "500ms", **extra)}}
    cluster = make_cluster(config)
    cluster.start(3, concurrency=2)
    _, _, tasks = build(cluster.env)
    loaded = load_config(config)
    args = {"tenant": "acme"} if keyed else {}
    # Within this of the change every decision uses the new limit: at once for an override
    # the script reads, after at most a cache refresh (and a round trip) for a default.
    lag_s = REFRESH_S + 0.1 if keyed else 0.0

    results, changes = [], []
    started = time.monotonic()
    for i in range(int(RATE_PER_S * 3 * PHASE_S)):
        # A steady stream, paced by the wall clock; the limit changes after each phase.
        time.sleep(max(0.0, started + i / RATE_PER_S - time.monotonic()))
        if i in (int(RATE_PER_S * PHASE_S), int(RATE_PER_S * 2 * PHASE_S)):
            new = "30/1s" if not changes else "5/1s"
            before = _redis_now(redis_client)
            set_override(redis_client, loaded, prefix, parse_limits([new]), tool="live")
            changes.append((before, _redis_now(redis_client)))
        results.append(tasks["live"].delay(n=i, **args))
    ended = await_outcomes(results, timeout_s=60)
    assert ended["lost"] == 0, ended

    runs = ledger(redis_client, prefix)
    admitted = sorted(run["admitted_at"] for run in runs)
    (raise_from, raised), (lower_from, lowered) = changes
    old = [a for a in admitted if a <= raise_from]
    middle = [a for a in admitted if raised + lag_s <= a <= lower_from]
    new = [a for a in admitted if a >= lowered + lag_s]
    old_counts = _counts_in_trailing_second(admitted, old)
    middle_counts = _counts_in_trailing_second(admitted, middle)
    new_counts = _counts_in_trailing_second(admitted, new)
    over_old = [a for a in admitted if a >= raised and _counts_in_trailing_second(
        admitted, [a])[0] > 10]
    after_lowering = [a for a in admitted if a >= lowered]
    over_new = [a for a, n in zip(after_lowering, _counts_in_trailing_second(
        admitted, after_lowering), strict=True) if n > 5]
    workers = {run["pid"] for run in runs}
    print(f"\nlive limits ({kind}): {ended}; admitted {len(old)} / {len(middle)} / {len(new)} "
          f"under 10/1s, 30/1s, 5/1s; busiest second {max(old_counts)} / "
          f"{max(middle_counts)} / {max(new_counts)}; first admission over the old limit "
          f"{(over_old[0] - raised) * 1000 if over_old else float('nan'):.0f} ms after the "
          f"raise, last over the new limit "
          f"{(over_new[-1] - lowered) * 1000 if over_new else 0:.0f} ms after the lowering; "
          f"{len(workers)} worker processes admitted calls")
    assert max(old_counts) <= 10  # before the raise: the file's limit
    assert max(middle_counts) <= 30  # between the changes: the raised one
    assert over_old and over_old[0] - raised <= 1.0  # the raise took effect within 1 s
    # Every window ending at an admission made once the lowering applies holds 5.
    assert new and max(new_counts) <= 5
    assert not over_new or over_new[-1] - lowered <= 1.0  # within 1 s
    assert len(workers) >= 3  # the admissions came from several workers' processes


def test_a_tier_set_live_for_one_key_leaves_the_other_keys_on_the_default(
    make_cluster: Any, redis_client: redis.Redis, prefix: str
) -> None:
    config = {"tools": {"tiered": tool(["2/1s"], "1500ms", key="tenant", params=KEYED_PARAMS)}}
    cluster = make_cluster(config)
    cluster.start(2, concurrency=2)
    _, _, tasks = build(cluster.env)
    set_override(redis_client, load_config(config), prefix, parse_limits(["6/1s"]),
                 tool="tiered", key="acme")
    tenant_of = {}
    for i in range(10):
        for tenant in ("acme", "bob", "carol"):
            tenant_of[tasks["tiered"].delay(n=i, tenant=tenant).id] = tenant
    results = [tasks["tiered"].AsyncResult(task_id) for task_id in tenant_of]
    ended = await_outcomes(results, timeout_s=60)
    assert ended["lost"] == 0, ended
    admitted: dict[str, list[float]] = {"acme": [], "bob": [], "carol": []}
    for run in ledger(redis_client, prefix):
        admitted[tenant_of[run["id"]]].append(run["admitted_at"])
    busiest = {tenant: most_in_window(times, 1.0) for tenant, times in admitted.items()}
    print(f"\ntiers: {ended}; busiest second per tenant {busiest}")
    assert 2 < busiest["acme"] <= 6  # its tier
    assert busiest["bob"] <= 2 and busiest["carol"] <= 2  # the file's default
    assert len(admitted["bob"]) >= 2 and len(admitted["carol"]) >= 2
