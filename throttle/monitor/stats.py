"""The monitoring counters kept in Redis: their fields, how workers add to them, how to read them.

Each tool has one hash of running totals (`keys.stats_key`) and short-lived hashes of the
same counts per 10 s bucket (`keys.recent_stats_key`), so `throttle status` can show the
last minute. Fields::

    decision:<outcome>:<reason>     gate decisions (outcome admit, delay or fallback); a call
                                    delayed twice makes two delay decisions
    delayed_calls:<reason>          calls delayed at least once, by the reason of their first
    arrived                         (10 s buckets only) calls decided for the first time
    body:sum, body:count            (10 s buckets only) seconds of tool bodies, and how many
    delay:le:<bound>                delays given, per histogram bucket (not cumulative)
    delay:sum, delay:count          seconds of delay given, and how many
    run:<status>:le:<bound>         body durations per bucket; status success, error, busy
    run:<status>:sum, :count
    store_errors                    the gate's store failed

Beside them, `keys.limits_key` holds the limits the workers enforce (expiring an hour after
the last call), so `throttle status` can warn when it reads with another config.

Workers add to a `StatsBuffer` in memory and flush it in one pipeline (HINCRBY /
HINCRBYFLOAT), so no call pays a Redis round trip for its metrics. Each flush renews the
totals' expiry (30 days): idle tools' counters go away, like every other throttle key.
The same flush keeps the sets of calls waiting with an ETA (throttle/monitor/waiting.py)
and, for fair tools, the per-tenant buckets (throttle/monitor/tenants.py).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from throttle.keys import (
    limits_key,
    recent_stats_key,
    stats_key,
    tenants_key,
    waiting_decided_key,
    waiting_key,
)
from throttle.monitor.waiting import DELAY_REASONS, KEY_TTL_S, NOTED_S, STALE_S, reason_label
from throttle.scripts import load_script
from throttle.store import STORE_ERRORS, StoreClient

DELAY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT_BUCKET_S = 10
RECENT_BUCKETS = 6  # the last minute: the current bucket and the five before it
RECENT_TTL_S = RECENT_BUCKET_S * (RECENT_BUCKETS + 2)
TOTALS_TTL_S = 30 * 86_400  # a tool idle for 30 days starts its counters again
LIMITS_TTL_S = 3600
OUTCOMES = ("admit", "delay", "fallback")
TENANTS_PER_BUCKET = 100  # see throttle/monitor/tenants.py
OTHER_TENANT = "other"


def _bound(value: float) -> str:
    return f"{value:g}"


def _bucket(bounds: tuple[float, ...], value: float) -> str:
    index = bisect.bisect_left(bounds, value)
    return _bound(bounds[index]) if index < len(bounds) else "+Inf"


_run_fields: dict[tuple[str, int], tuple[str, str, str]] = {}  # (status, bucket) -> fields


def _run_fields_of(status: str, seconds: float) -> tuple[str, str, str]:
    """The fields a run of `seconds` ending with `status` counts in: its histogram bucket,
    count and sum (made once per status and bucket: every call counts its run)."""
    key = (status, bisect.bisect_left(DURATION_BUCKETS_S, seconds))
    fields = _run_fields.get(key)
    if fields is None:
        fields = _run_fields[key] = (
            f"run:{status}:le:{_bucket(DURATION_BUCKETS_S, seconds)}", f"run:{status}:count",
            f"run:{status}:sum")
    return fields


class StatsBuffer:
    """Counts added in this process and not yet flushed to Redis (thread-safe)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._recent: set[str] = set()
        # (tool, task id) -> its latest delay (reason, ETA ms, which delay of the call), or
        # None; and the delays before the latest decision that ended a wait (0: none; -1:
        # revoked)
        self._waiting: dict[tuple[str, str], tuple[Held | None, int]] = {}
        self._limits: dict[str, str] = {}
        self._tenants: dict[str, set[str]] = defaultdict(set)  # bucket key -> tenants counted
        # Keys built once per tool (and per bucket): every call counts under them.
        self._totals_keys: dict[str, str] = {}
        self._recent_keys: dict[str, tuple[int, str]] = {}  # tool -> (bucket start s, key)

    def _keys_of(self, tool: str, at_s: float) -> tuple[str, str]:
        """`tool`'s totals key and the key of its recent bucket holding wall time `at_s`."""
        totals = self._totals_keys.get(tool)
        if totals is None:
            totals = self._totals_keys[tool] = stats_key(self.prefix, tool)
        bucket_s = int(at_s) // RECENT_BUCKET_S * RECENT_BUCKET_S
        recent = self._recent_keys.get(tool)
        if recent is None or recent[0] != bucket_s:
            recent = self._recent_keys[tool] = (
                bucket_s, recent_stats_key(self.prefix, tool, bucket_s))
        return totals, recent[1]

    def add_tenant_admission(self, tool: str, tenant: str, waited_s: float, at_s: float) -> None:
        """Count an admitted call of a fair tool under its tenant, with how long it waited
        (at most TENANTS_PER_BUCKET tenants per bucket and process; the rest as "other")."""
        bucket = tenants_key(self.prefix, tool, int(at_s) // RECENT_BUCKET_S * RECENT_BUCKET_S)
        with self._lock:
            seen = self._tenants[bucket]
            if tenant not in seen and len(seen) >= TENANTS_PER_BUCKET:
                tenant = OTHER_TENANT
            seen.add(tenant)
            self._counts[bucket, f"{tenant}|admitted"] += 1
            self._sums[bucket, f"{tenant}|waited"] += max(0.0, waited_s)
            self._recent.add(bucket)

    def add_decision(
        self, tool: str, outcome: str, reason: str, wait_s: float, at_s: float,
        call_id: str | None = None, delays_before: int | None = None,
    ) -> None:
        """Count one decision (and, for a delay, the wait it gave) at wall time `at_s`.

        `call_id` and `delays_before` (how often the call was delayed before) keep the
        waiting calls' sets and the count of delayed calls; without them only decisions count.
        """
        totals, recent = self._keys_of(tool, at_s)
        name = f"decision:{outcome}:{reason}"
        with self._lock:
            self._counts[totals, name] += 1
            self._counts[recent, name] += 1
            self._recent.add(recent)
            if delays_before is None:
                call_id, delays_before = None, 0
            elif delays_before == 0:
                self._counts[recent, "arrived"] += 1
                if outcome == "delay":
                    self._counts[totals, f"delayed_calls:{reason}"] += 1
                    self._counts[recent, f"delayed_calls:{reason}"] += 1
            if call_id is not None and (outcome == "delay" or delays_before > 0):
                held = ((reason_label("delay", reason), (at_s + wait_s) * 1000, delays_before + 1)
                        if outcome == "delay" else None)
                _, cleared = self._waiting.get((tool, call_id), (None, 0))
                self._waiting[tool, call_id] = (held, delays_before or cleared)
            if outcome == "delay":
                self._counts[totals, f"delay:le:{_bucket(DELAY_BUCKETS_S, wait_s)}"] += 1
                self._counts[totals, "delay:count"] += 1
                self._sums[totals, "delay:sum"] += wait_s

    def forget_waiting(self, tool: str, call_id: str) -> None:
        """A held call that will not come back (revoked) leaves every reason's set."""
        with self._lock:
            _, cleared = self._waiting.get((tool, call_id), (None, 0))
            self._waiting[tool, call_id] = (None, cleared or -1)

    def note_limits(self, tool: str, limits: str) -> None:
        """Record the limits this process enforces for `tool` (written at the next flush)."""
        self._limits[tool] = limits

    def add_run(self, tool: str, status: str, seconds: float, at_s: float | None = None) -> None:
        """Count one body run of `seconds` that ended with `status` at wall time `at_s`."""
        totals, recent = self._keys_of(tool, time.time() if at_s is None else at_s)
        bucket, count, total = _run_fields_of(status, seconds)
        with self._lock:
            self._counts[recent, "body:count"] += 1
            self._sums[recent, "body:sum"] += seconds
            self._recent.add(recent)
            self._counts[totals, bucket] += 1
            self._counts[totals, count] += 1
            self._sums[totals, total] += seconds

    def add_store_error(self, tool: str) -> None:
        """Count one failure of the gate's store."""
        with self._lock:
            self._counts[stats_key(self.prefix, tool), "store_errors"] += 1

    def clear(self) -> None:
        """Forget everything pending (a forked child must not flush its parent's counts)."""
        self._lock = threading.Lock()
        self._counts.clear()
        self._sums.clear()
        self._recent.clear()
        self._waiting.clear()
        self._limits.clear()
        self._tenants.clear()

    def flush(self, client: StoreClient) -> int:
        """Write the pending counts in one pipeline; returns how many fields it wrote.

        On a Redis error the counts are kept for the next flush, and the error is raised.
        """
        with self._lock:
            counts, self._counts = self._counts, defaultdict(int)
            sums, self._sums = self._sums, defaultdict(float)
            recent, self._recent = self._recent, set()
            waiting, self._waiting = self._waiting, {}
            limits, self._limits = self._limits, {}
            if len(self._tenants) > 2 * RECENT_BUCKETS:  # older buckets are written
                self._tenants.clear()
        if not counts and not sums and not waiting:
            return 0
        pipe = client.pipeline(transaction=False)
        for tool, text in limits.items():
            pipe.set(limits_key(self.prefix, tool), text, ex=LIMITS_TTL_S)
        for (key, name), count in counts.items():
            pipe.hincrby(key, name, count)
        for (key, name), total in sums.items():
            pipe.hincrbyfloat(key, name, total)
        for key in {key for key, _ in counts} - recent:
            pipe.expire(key, TOTALS_TTL_S)
        for key in recent:
            pipe.expire(key, RECENT_TTL_S)
        try:
            self._write_waiting(client, waiting)
            pipe.execute()
        except STORE_ERRORS:
            with self._lock:
                for item, count in counts.items():
                    self._counts[item] += count
                for item, total in sums.items():
                    self._sums[item] += total
                self._recent |= recent
                self._waiting = waiting | self._waiting  # a newer decision wins
            raise
        return len(counts) + len(sums) + len(waiting)

    def _write_waiting(
        self, client: StoreClient, waiting: Mapping[tuple[str, str], tuple[Held | None, int]]
    ) -> None:
        """Take decided calls out of every reason's set; put delayed ones in their reason's,
        unless their next decision is noted already (waiting.lua: one call per tool)."""
        per_tool: dict[str, list[str | float]] = defaultdict(list)
        for (tool, call_id), (held, cleared) in waiting.items():
            reason, eta_ms, nth = held or ("", 0.0, 0)
            index = DELAY_REASONS.index(reason) + 1 if reason in DELAY_REASONS else 0
            per_tool[tool] += [call_id, cleared, index, eta_ms, nth]
        if not per_tool:
            return
        script = client.register_script(_WAITING_SCRIPT)
        now_ms = time.time() * 1000
        for tool, args in per_tool.items():
            keys = [waiting_key(self.prefix, tool, reason) for reason in DELAY_REASONS]
            script(keys=[*keys, waiting_decided_key(self.prefix, tool)],
                   args=[now_ms, now_ms - STALE_S * 1000, KEY_TTL_S, now_ms - NOTED_S * 1000,
                         *args])


# A delay: its reason, ETA (ms) and which delay of the call it is (1 for the first).
Held = tuple[str, float, int]
_WAITING_SCRIPT = load_script("waiting")


@dataclass(frozen=True, slots=True)
class Histogram:
    """Per-bucket counts (bounds ascending, the last one +Inf), their sum and count."""

    bounds: tuple[str, ...]
    counts: tuple[int, ...]
    total: float
    count: int

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, as Prometheus exposes them."""
        running, out = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


@dataclass(frozen=True, slots=True)
class ToolTotals:
    """One tool's counters, read back from Redis."""

    decisions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    delayed_calls: Mapping[str, int] = field(default_factory=dict)
    delay: Histogram | None = None
    runs: Mapping[str, Histogram] = field(default_factory=dict)
    store_errors: int = 0

    def outcome(self, outcome: str) -> int:
        """Calls decided with `outcome`, whatever the reason."""
        return sum(self.decisions.get(outcome, {}).values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _histogram(fields: Mapping[str, str], head: str, bounds_s: tuple[float, ...]) -> Histogram:
    bounds = (*(_bound(b) for b in bounds_s), "+Inf")
    return Histogram(
        bounds=bounds,
        counts=tuple(int(fields.get(f"{head}:le:{b}", 0)) for b in bounds),
        total=float(fields.get(f"{head}:sum", 0)),
        count=int(fields.get(f"{head}:count", 0)),
    )


def parse_totals(raw: Mapping[Any, Any]) -> ToolTotals:
    """A tool's counters from the HGETALL of its stats hash (or of several, summed)."""
    fields = {_text(name): _text(value) for name, value in raw.items()}
    decisions: dict[str, dict[str, int]] = {}
    delayed_calls: dict[str, int] = {}
    statuses: set[str] = set()
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        if kind == "decision":
            outcome, _, reason = rest.partition(":")
            decisions.setdefault(outcome, {})[reason] = int(value)
        elif kind == "delayed_calls":
            delayed_calls[rest] = int(value)
        elif kind == "run":
            statuses.add(rest.partition(":")[0])
    return ToolTotals(
        decisions=decisions,
        delayed_calls=delayed_calls,
        delay=_histogram(fields, "delay", DELAY_BUCKETS_S),
        runs={status: _histogram(fields, f"run:{status}", DURATION_BUCKETS_S)
              for status in sorted(statuses)},
        store_errors=int(fields.get("store_errors", 0)),
    )


def recent_keys(prefix: str, tool: str, now_s: float) -> list[str]:
    """The bucket hashes that make up `tool`'s last minute at `now_s`."""
    current = int(now_s) // RECENT_BUCKET_S * RECENT_BUCKET_S
    return [recent_stats_key(prefix, tool, current - i * RECENT_BUCKET_S)
            for i in range(RECENT_BUCKETS)]


RECENT_FIELDS = (*OUTCOMES, "delayed_calls", "arrived", "body:sum", "body:count")


def sum_recent(raws: list[Mapping[Any, Any]]) -> dict[str, float]:
    """Over the HGETALLs of a tool's recent buckets: decisions per outcome, calls delayed,
    calls arrived, and the seconds and count of tool bodies (the keys of RECENT_FIELDS)."""
    totals = dict.fromkeys(RECENT_FIELDS, 0.0)
    for raw in raws:
        for name, value in raw.items():
            field_name = _text(name)
            kind, _, rest = field_name.partition(":")
            if kind == "decision":
                outcome = rest.partition(":")[0]
                totals[outcome] = totals.get(outcome, 0) + int(value)
            elif kind == "delayed_calls":
                totals[kind] += int(value)
            elif field_name in RECENT_FIELDS:
                totals[field_name] += float(value)
    return totals
