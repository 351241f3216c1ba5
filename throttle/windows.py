"""Checking a log of admissions against a limit: the most units in any window.

The gate, the demo's summary, the benchmarks and the tests all read "the busiest window"
the same way, here: a window is the half-open interval (t - window_s, t], so two entries
exactly one window apart never share one (as the gate counts them).
"""

from __future__ import annotations

from collections.abc import Sequence

# Times are epoch seconds from microsecond scores: closer than this counts as equal.
EPSILON_S = 1e-7


def most_in_window(
    times: Sequence[float], window_s: float, units: Sequence[float] | None = None
) -> float:
    """The most entries (or the most of their `units`) in any interval (t - window_s, t]."""
    weights = [1.0] * len(times) if units is None else list(units)
    ordered = sorted(zip(times, weights, strict=True))
    best = total = 0.0
    start = 0
    for at, weight in ordered:
        total += weight
        while ordered[start][0] <= at - window_s + EPSILON_S:
            total -= ordered[start][1]
            start += 1
        best = max(best, total)
    return best
