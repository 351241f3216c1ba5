"""Decision reasons (a fixed set, the `reason` label) and the registry of calls held with an ETA.

A delayed call is held in a worker's memory until its ETA: the broker's queue no longer has
it and nothing else in Redis says why it waits. So the metrics record it: each call's delay
adds its task id to `keys.waiting_key(prefix, tool, reason)` scored by its ETA, and its
next decision (admit, fallback or another delay) takes it out of every reason's set. The
writes go out with the counters' once-a-second flush, from whichever process decided, so
the sets hold every waiting call of every worker on every host.

A call counts as waiting from its delay until its next decision, its revocation, or until
`GRACE_S` past its ETA, whichever comes first: a call whose worker died leaves the count by
itself. Two processes may flush in either order (a call parked by one and admitted by
another 50 ms later): each decision that ends a wait is noted for `NOTED_S`, as the task id
and the delays before it, and a delay whose next decision is noted already is not written
(throttle/lua/waiting.lua). A revocation is not noted: a delay flushed after it lasts until
`GRACE_S` past its ETA.
"""

from __future__ import annotations

ADMIT_REASONS = ("admitted", "reservation", "readmitted", "store_unavailable")
DELAY_REASONS = ("reserved", "early", "late", "pool", "concurrency", "cooldown",
                 "store_unavailable", "quota", "parked")
FALLBACK_REASONS = ("deadline", "cost_exceeds_limit", "cooldown", "store_unavailable",
                    "redelivery_cap", "quota")
REASONS = {"admit": ADMIT_REASONS, "delay": DELAY_REASONS, "fallback": FALLBACK_REASONS}
OTHER = "other"

GRACE_S = 5.0  # a call still counts this long past its ETA (flush interval and lateness)
STALE_S = 600.0  # entries this far past their ETA are deleted at the next flush
KEY_TTL_S = 2 * 86_400  # a tool with no delays for this long loses its sets
NOTED_S = 60.0  # a decision that ended a wait is noted this long (a flush's lateness, at most)


def reason_label(outcome: str, reason: str) -> str:
    """`reason` if it is one of `outcome`'s known reasons, else "other" (a fixed label set)."""
    return reason if reason in REASONS.get(outcome, ()) else OTHER
