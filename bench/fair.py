"""Fair sharing (`fair_by`): what a flood does to quiet tenants, with and without it.

What it measures (every row against the same Redis, `THROTTLE_REDIS_URL`)
    flood        gate level, pinned clock (simulated time, so it runs in seconds): a tool
                 limited to 20/1s; tenant A sends 400 calls at once, 9 other tenants send 10
                 each 0.1 s later; every DELAY comes back at its slot. Per row (FIFO: the same
                 tool without `fair_by`; fair): the quiet tenants' longest wait against their
                 fair-share time (10 calls at 20/10 per s = 5 s, plus one window), the most
                 admitted in any 1 s window (must be <= 20), the utilization while a backlog
                 exists (units admitted / the limit's capacity from the first arrival to the
                 last admission, target >= 0.95) and the decisions per call (a parked call is
                 decided again when it comes back).
    zipf         10 tenants whose demand follows Zipf (tenant k sends 300/k calls within the
                 first 2 s), and a weighted variant (tenant 1 has weight 3): Jain's fairness
                 index of the admitted rate (over each tenant's weight) among the tenants that
                 are backlogged for a whole bucket, averaged over the buckets; target >= 0.95
                 for fair over 5 s buckets, FIFO as the baseline. Over 1 s buckets (2 calls
                 per tenant per bucket) the order of slots within the horizon shows as noise.
    cost         decisions per second, real clock, one client: a tool whose limit never binds
                 (every call ADMIT) and one limited to 10/1s (every call after the first waits:
                 reserved without fair_by, mostly parked with it), each with and without
                 `fair_by`, slices of 1,000 calls alternating; best of `--rounds` (and the
                 range of the rounds' ratios); target fair >= 0.8x the same tool without it.
    celery       (`--celery`; `--quick` is smaller) the flood through 3 real `celery worker`
                 nodes (prefork, 2 processes each), FIFO then fair: the quiet tenants' longest
                 wait from their send to their body's start, the most admitted in a window,
                 when A's last call ran, and how fast the workers pass a backlog through the
                 gate (first decisions per second): a quiet call queued behind N messages waits
                 about N / that rate before the gate sees it at all.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from throttle import Action, Gate, load_config
from throttle.keys import fair_keys, tool_keys
from throttle.windows import most_in_window

BASE_S = 1_700_000_000.0
TOOL = "shared"


def config(limit: str, fair: bool, weights: dict[str, float] | None = None,
           max_delay: str = "120s") -> dict[str, Any]:
    tool: dict[str, Any] = {"limits": [limit], "max_delay": max_delay}
    if fair:
        tool["fair_by"] = "tenant"
        tool["fair_weights"] = weights or {}
    return {"broker": {"visibility_timeout": "2h"}, "tools": {TOOL: tool}}


@dataclass
class Sim:
    """One simulated run: when each call arrived and was admitted, and how often decided."""

    arrivals: dict[str, tuple[str, float]]  # member -> (tenant, arrival s)
    admitted: dict[str, float] = field(default_factory=dict)
    decisions: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def simulate(client: redis.Redis, cfg: dict[str, Any],
             arrivals: dict[str, tuple[str, float]]) -> Sim:
    """Replay `arrivals` through the gate with a pinned clock; DELAYs come back at their slot."""
    prefix = f"bench-fair-{uuid.uuid4().hex[:8]}"
    gate = Gate(client, load_config(cfg), prefix=prefix)
    sim = Sim(arrivals)
    events = [(at, i, m) for i, (m, (_, at)) in enumerate(arrivals.items())]
    heapq.heapify(events)
    sequence = len(events)
    try:
        while events:
            at, _, member = heapq.heappop(events)
            decision = gate.acquire(TOOL, member, fair_key=arrivals[member][0],
                                    now_s=BASE_S + at)
            sim.decisions += 1
            sim.reasons[f"{decision.action.value}:{decision.reason}"] += 1
            if decision.action is Action.ADMIT:
                sim.admitted[member] = at
            elif decision.action is Action.DELAY:
                sequence += 1
                back = max(decision.slot_at - BASE_S, at + 0.001)
                heapq.heappush(events, (round(back, 3), sequence, member))
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    return sim


def flood_arrivals(flood: int = 400, quiet: int = 9, each: int = 10,
                   after_s: float = 0.1) -> dict[str, tuple[str, float]]:
    arrivals = {f"a-{i}": ("a", 0.0) for i in range(flood)}
    for k in range(quiet):
        arrivals.update({f"q{k}-{i}": (f"q{k}", after_s) for i in range(each)})
    return arrivals


def flood_row(client: redis.Redis, fair: bool) -> dict[str, Any]:
    sim = simulate(client, config("20/1s", fair), flood_arrivals())
    waits: dict[str, float] = {}
    for member, at in sim.admitted.items():
        tenant, arrived = sim.arrivals[member]
        waits[tenant] = max(waits.get(tenant, 0.0), at - arrived)
    quiet = [w for t, w in waits.items() if t != "a"]
    times = sorted(sim.admitted.values())
    span = times[-1] - min(at for _, at in sim.arrivals.values())
    return {
        "row": "fair" if fair else "FIFO", "quiet_max_wait_s": max(quiet),
        "quiet_mean_of_max_s": sum(quiet) / len(quiet), "fair_share_bound_s": 5.0 + 1.0,
        "flood_last_s": waits["a"], "most_in_1s": most_in_window(times, 1.0),
        "utilization": len(times) / (20 * span / 1.0 + 20),
        "decisions_per_call": sim.decisions / len(sim.arrivals),
        "reasons": dict(sim.reasons),
    }


def zipf_row(client: redis.Redis, fair: bool, weights: dict[str, float]) -> dict[str, Any]:
    rng = random.Random(17)
    arrivals = {f"t{k}-{i}": (f"t{k}", round(rng.uniform(0, 2), 3))
                for k in range(1, 11) for i in range(300 // k)}
    sim = simulate(client, config("20/1s", fair, weights), arrivals)
    return {"row": ("fair" if fair else "FIFO") + (" weighted" if weights else ""),
            "jain_5s": jain(sim, weights, 5.0), "jain_1s": jain(sim, weights, 1.0),
            "most_in_1s": most_in_window(sorted(sim.admitted.values()), 1.0)}


def jain(sim: Sim, weights: dict[str, float], bucket_s: float) -> float:
    """Jain's index of the admitted rate over weight among the tenants backlogged all
    through a bucket (every call arrived before it, some admitted after it), averaged over
    the buckets from 2 s (when every call has arrived) with two such tenants or more."""
    tenants: dict[str, list[str]] = {}
    for member, (tenant, _) in sim.arrivals.items():
        tenants.setdefault(tenant, []).append(member)
    end = max(sim.admitted.values())
    indices = []
    start = 2.0
    while start + bucket_s <= end:
        rates = []
        for tenant, mine in tenants.items():
            if max(sim.admitted[m] for m in mine) < start + bucket_s:
                continue  # not backlogged all through the bucket
            got = sum(1 for m in mine if start <= sim.admitted[m] < start + bucket_s)
            rates.append(got / weights.get(tenant, 1.0))
        if len(rates) >= 2 and sum(rates) > 0:
            indices.append(sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates)))
        start += bucket_s
    return sum(indices) / len(indices)


def cost_rows(client: redis.Redis, n: int, rounds: int) -> list[dict[str, Any]]:
    """Decisions per second, real clock: each tool with and without fair_by, interleaved."""
    contenders = [(label, limit, fair) for label, limit in
                  (("admit-heavy", "10000000/10m"), ("delay-heavy", "10/1s"))
                  for fair in (False, True)]
    best: dict[tuple[str, bool], float] = {}
    ratios: dict[str, list[float]] = {}  # per round: fair / plain
    answers: dict[tuple[str, bool], Counter[str]] = {}
    for _ in range(rounds):
        prefixes = {c: f"bench-fair-{uuid.uuid4().hex[:8]}" for c in contenders}
        gates = {c: Gate(client, load_config(config(c[1], c[2], max_delay="59m")),
                         prefix=prefixes[c]) for c in contenders}
        spent = dict.fromkeys(contenders, 0.0)
        done = 0
        while done < n:
            order = contenders[done // 1000 % len(contenders):] + \
                contenders[:done // 1000 % len(contenders)]
            for c in order:
                gate = gates[c]
                seen = answers.setdefault((c[0], c[2]), Counter())
                started = time.perf_counter()
                for i in range(done, done + 1000):
                    d = gate.acquire(TOOL, f"m{i}", fair_key=f"tenant-{i % 100}")
                    seen[d.reason] += 1
                spent[c] += time.perf_counter() - started
            done += 1000
        for label in ("admit-heavy", "delay-heavy"):
            pair = [c for c in contenders if c[0] == label]
            plain, fair = (spent[c] for c in sorted(pair, key=lambda c: c[2]))
            ratios.setdefault(label, []).append(plain / fair)
        for c in contenders:
            rate = n / spent[c]
            best[(c[0], c[2])] = max(best.get((c[0], c[2]), 0.0), rate)
            keys = list(client.scan_iter(match=f"{prefixes[c]}:*", count=1000))
            if keys:
                client.delete(*keys)
    rows = []
    for label in ("admit-heavy", "delay-heavy"):
        plain, fair = best[(label, False)], best[(label, True)]
        low, high = min(ratios[label]), max(ratios[label])
        rows.append({"row": label, "plain_per_s": plain, "fair_per_s": fair,
                     "ratio": fair / plain, "ratio_range": f"{low:.2f}-{high:.2f}",
                     "answers_fair": dict(answers[(label, True)])})
    return rows


# -- Celery: the flood through real worker nodes ---------------------------------------------

def celery_row(url: str, fair: bool, quick: bool, workdir: Path) -> dict[str, Any]:
    from bench.apps import Node, build, start_nodes, stop_nodes

    limit, flood, quiet, each = ("10/1s", 100, 4, 5) if quick else ("20/1s", 400, 9, 10)
    prefix = f"bench-fair-{uuid.uuid4().hex[:8]}"
    broker, backend = _with_db(url, 14), _with_db(url, 15)
    for db_url in (broker, backend):
        redis.Redis.from_url(db_url).flushdb()  # databases this bench owns
    env = {"BENCH_REDIS_URL": url, "BENCH_PREFIX": prefix, "BENCH_BROKER_URL": broker,
           "BENCH_RESULT_BACKEND": backend,
           "BENCH_CONFIG": json.dumps(config(limit, fair, max_delay="5m"))}
    nodes = [Node(f"fair{i}", "throttle", [f"tool.{TOOL}"], workdir / f"node{i}.log")
             for i in range(3)]
    client = redis.Redis.from_url(url)
    app, _, tasks = build(env)
    task = tasks[TOOL]
    try:
        start_nodes(nodes, env, concurrency=2)
        sent_s = _redis_now(client)
        for _ in range(flood):
            task.apply_async(kwargs={"tenant": "a", "run": "a"}, ignore_result=True)
        quiet_sent_s = _redis_now(client)
        for k in range(quiet):
            for _ in range(each):
                task.apply_async(kwargs={"tenant": f"q{k}", "run": f"q{k}"},
                                 ignore_result=True)
        total = flood + quiet * each
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            got = sum(client.llen(f"{prefix}:rec:{r}") for r in ["a"] + [f"q{k}" for k in
                                                                       range(quiet)])
            if got >= total:
                break
            time.sleep(0.02)
        records = {r: [_record(raw) for raw in client.lrange(f"{prefix}:rec:{r}", 0, -1)]
                   for r in ["a"] + [f"q{k}" for k in range(quiet)]}
    finally:
        stop_nodes(nodes)
        app.close()
        keys_left = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys_left:
            client.delete(*keys_left)
    started = [at for rows in records.values() for at, _ in rows]
    admitted = [adm for rows in records.values() for _, adm in rows if adm]
    quiet_waits = [max(at for at, _ in rows) - quiet_sent_s
                   for r, rows in records.items() if r != "a" and rows]
    ran = sum(len(rows) for rows in records.values())
    return {"row": ("fair" if fair else "FIFO") + (" (quick)" if quick else ""),
            "limit": limit, "flood": flood, "quiet": f"{quiet}x{each}", "ran": ran,
            "quiet_max_wait_s": max(quiet_waits),
            "fair_share_s": each * (quiet + 1) / int(limit.split("/")[0]) + 1.0,
            "flood_last_s": max(at for at, _ in records["a"]) - sent_s,
            "most_admitted_in_1s": most_in_window(admitted, 1.0),
            "most_started_in_1s": most_in_window(started, 1.0)}


def pass_through(url: str, count: int, workdir: Path) -> dict[str, Any]:
    """How fast 3 nodes give `count` queued calls their first decision: a fair tool at 1/10s
    (max_delay 90 m, so none falls back) parks all but the first, and the first to come back
    does so after 5 s: until then the fair queue's size counts the calls decided."""
    from bench.apps import Node, build, start_nodes, stop_nodes

    prefix = f"bench-fair-{uuid.uuid4().hex[:8]}"
    broker = _with_db(url, 14)
    redis.Redis.from_url(broker).flushdb()
    env = {"BENCH_REDIS_URL": url, "BENCH_PREFIX": prefix, "BENCH_BROKER_URL": broker,
           "BENCH_RESULT_BACKEND": _with_db(url, 15),
           "BENCH_CONFIG": json.dumps(config("1/10s", True, max_delay="90m"))}
    nodes = [Node(f"pass{i}", "throttle", [f"tool.{TOOL}"], workdir / f"pass{i}.log")
             for i in range(3)]
    client = redis.Redis.from_url(url)
    app, _, tasks = build(env)
    queue = fair_keys(tool_keys(prefix, TOOL), None, prefix)[1]
    try:
        start_nodes(nodes, env, concurrency=2)
        started = time.monotonic()  # the workers take calls while they are being sent
        for _ in range(count):
            tasks[TOOL].apply_async(kwargs={"tenant": "a"}, ignore_result=True)
        while client.zcard(queue) < count - 1 and time.monotonic() - started < 60:
            time.sleep(0.01)
        elapsed = time.monotonic() - started
    finally:
        stop_nodes(nodes)
        app.close()
        redis.Redis.from_url(broker).flushdb()
        keys_left = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys_left:
            client.delete(*keys_left)
    return {"row": "first decisions", "calls": count, "seconds": elapsed,
            "decided_per_s": count / elapsed}


def _record(raw: bytes) -> tuple[float, float | None]:
    at, entry = raw.decode().split(" ", 1)
    _, _, admitted, _ = json.loads(entry)
    return float(at), admitted


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def _with_db(url: str, db: int) -> str:
    from urllib.parse import urlsplit, urlunsplit
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


# -- report ------------------------------------------------------------------------------------

def table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column == "row" else "right")
    for row in rows:
        out.add_row(*(_fmt(row.get(column)) for column in columns))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def targets(result: dict[str, Any]) -> dict[str, bool]:
    flood = {row["row"]: row for row in result["flood"]}["fair"]
    zipf = [row for row in result["zipf"] if row["row"].startswith("fair")]
    checks = {
        "quiet wait <= fair share + window": flood["quiet_max_wait_s"] <= 6.0,
        "most in 1 s <= 20": all(row["most_in_1s"] <= 20 for row in result["flood"]),
        "utilization >= 0.95": flood["utilization"] >= 0.95,
        "Jain (5 s) >= 0.95": all(row["jain_5s"] >= 0.95 for row in zipf),
    }
    if result.get("cost"):
        checks["cost >= 0.8x"] = all(row["ratio"] >= 0.8 for row in result["cost"])
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="calls per cost run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--celery", action="store_true", help="also run 3 real worker nodes")
    parser.add_argument("--quick", action="store_true", help="a smaller Celery flood")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 on a missed target")
    args = parser.parse_args(argv)
    url = os.environ.get("THROTTLE_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url)
    console = Console()
    result: dict[str, Any] = {
        "flood": [flood_row(client, fair) for fair in (False, True)],
        "zipf": [zipf_row(client, fair, weights) for weights in ({}, {"t1": 3.0})
                 for fair in (False, True)],
        "cost": cost_rows(client, args.n, args.rounds) if args.n else [],
    }
    console.print(table("flood: 20/1s, A 400 at once, 9 tenants x 10 at 0.1 s (pinned clock)",
                        result["flood"], ["row", "quiet_max_wait_s", "quiet_mean_of_max_s",
                                          "fair_share_bound_s", "flood_last_s", "most_in_1s",
                                          "utilization", "decisions_per_call"]))
    console.print(table("zipf: 10 tenants, tenant k sends 300/k in 2 s; Jain's index",
                        result["zipf"], ["row", "jain_5s", "jain_1s", "most_in_1s"]))
    if result["cost"]:
        console.print(table("cost: decisions/s, fair vs the same tool without fair_by",
                            result["cost"], ["row", "plain_per_s", "fair_per_s", "ratio",
                                             "ratio_range"]))
    if args.celery:
        with tempfile.TemporaryDirectory(prefix="bench-fair-") as workdir:
            result["celery"] = [celery_row(url, fair, args.quick, Path(workdir))
                                for fair in (False, True)]
            result["pass_through"] = [pass_through(url, 100 if args.quick else 400,
                                                   Path(workdir))]
        console.print(table("celery: the flood through 3 worker nodes", result["celery"], [
            "row", "limit", "flood", "quiet", "ran", "quiet_max_wait_s", "fair_share_s",
            "flood_last_s", "most_admitted_in_1s", "most_started_in_1s"]))
        console.print(table("celery: a backlog's first pass through the gate (3 nodes)",
                            result["pass_through"], ["row", "calls", "seconds",
                                                     "decided_per_s"]))
    result["targets"] = targets(result)
    console.print("targets: " + ", ".join(f"{name}: {'ok' if ok else 'MISSED'}"
                                          for name, ok in result["targets"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 1 if args.check and not all(result["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

