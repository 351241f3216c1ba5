"""The monitoring counters kept in Redis: their fields, how workers add to them, how to read them.

Each tool has one hash of running totals (`keys.stats_key`) and short-lived hashes of the
same counts per 10 s bucket (`keys.recent_stats_key`), so `throttle status` can show the
last minute. Fields::

    decision:<outcome>:<reason>     calls decided (outcome admit, delay or fallback)
    delay:le:<bound>                delays given, per histogram bucket (not cumulative)
    delay:sum, delay:count          seconds of delay given, and how many
    run:<status>:le:<bound>         body durations per bucket; status success, error, busy
    run:<status>:sum, :count
    store_errors                    the gate's store failed

Workers add to a `StatsBuffer` in memory and flush it in one pipeline (HINCRBY /
HINCRBYFLOAT), so no call pays a Redis round trip for its metrics. Each flush renews the
totals' expiry (30 days): idle tools' counters go away, like every other throttle key.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from throttle.keys import recent_stats_key, stats_key
from throttle.store import STORE_ERRORS, StoreClient

DELAY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT_BUCKET_S = 10
RECENT_BUCKETS = 6  # the last minute: the current bucket and the five before it
RECENT_TTL_S = RECENT_BUCKET_S * (RECENT_BUCKETS + 2)
TOTALS_TTL_S = 30 * 86_400  # a tool idle for 30 days starts its counters again
OUTCOMES = ("admit", "delay", "fallback")


def _bound(value: float) -> str:
    return f"{value:g}"


def _bucket(bounds: tuple[float, ...], value: float) -> str:
    index = bisect.bisect_left(bounds, value)
    return _bound(bounds[index]) if index < len(bounds) else "+Inf"


class StatsBuffer:
    """Counts added in this process and not yet flushed to Redis (thread-safe)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._recent: set[str] = set()

    def add_decision(
        self, tool: str, outcome: str, reason: str, wait_s: float, at_s: float
    ) -> None:
        """Count one decision (and, for a delay, the wait it gave) at wall time `at_s`."""
        totals = stats_key(self.prefix, tool)
        recent = recent_stats_key(self.prefix, tool, int(at_s) // RECENT_BUCKET_S * RECENT_BUCKET_S)
        name = f"decision:{outcome}:{reason}"
        with self._lock:
            self._counts[totals, name] += 1
            self._counts[recent, name] += 1
            self._recent.add(recent)
            if outcome == "delay":
                self._counts[totals, f"delay:le:{_bucket(DELAY_BUCKETS_S, wait_s)}"] += 1
                self._counts[totals, "delay:count"] += 1
                self._sums[totals, "delay:sum"] += wait_s

    def add_run(self, tool: str, status: str, seconds: float) -> None:
        """Count one body run of `seconds` that ended with `status`."""
        totals = stats_key(self.prefix, tool)
        with self._lock:
            self._counts[totals, f"run:{status}:le:{_bucket(DURATION_BUCKETS_S, seconds)}"] += 1
            self._counts[totals, f"run:{status}:count"] += 1
            self._sums[totals, f"run:{status}:sum"] += seconds

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

    def flush(self, client: StoreClient) -> int:
        """Write the pending counts in one pipeline; returns how many fields it wrote.

        On a Redis error the counts are kept for the next flush, and the error is raised.
        """
        with self._lock:
            counts, self._counts = self._counts, defaultdict(int)
            sums, self._sums = self._sums, defaultdict(float)
            recent, self._recent = self._recent, set()
        if not counts and not sums:
            return 0
        pipe = client.pipeline(transaction=False)
        for (key, name), count in counts.items():
            pipe.hincrby(key, name, count)
        for (key, name), total in sums.items():
            pipe.hincrbyfloat(key, name, total)
        for key in {key for key, _ in counts} - recent:
            pipe.expire(key, TOTALS_TTL_S)
        for key in recent:
            pipe.expire(key, RECENT_TTL_S)
        try:
            pipe.execute()
        except STORE_ERRORS:
            with self._lock:
                for item, count in counts.items():
                    self._counts[item] += count
                for item, total in sums.items():
                    self._sums[item] += total
                self._recent |= recent
            raise
        return len(counts) + len(sums)


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
    statuses: set[str] = set()
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        if kind == "decision":
            outcome, _, reason = rest.partition(":")
            decisions.setdefault(outcome, {})[reason] = int(value)
        elif kind == "run":
            statuses.add(rest.partition(":")[0])
    return ToolTotals(
        decisions=decisions,
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


def sum_recent(raws: list[Mapping[Any, Any]]) -> dict[str, int]:
    """Decisions per outcome over the HGETALLs of a tool's recent buckets."""
    totals = dict.fromkeys(OUTCOMES, 0)
    for raw in raws:
        for name, value in raw.items():
            kind, _, rest = _text(name).partition(":")
            if kind == "decision":
                outcome = rest.partition(":")[0]
                totals[outcome] = totals.get(outcome, 0) + int(value)
    return totals
