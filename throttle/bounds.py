"""The bounds a tools file's numbers and names must keep (README, "Configuration").

Past them a value stops meaning what it says: a window of 10^17 hours overflows the gate's
millisecond scores (it surfaced as a false "Redis unreachable"), an infinite cost can never
be admitted, a slot margin longer than a window moves every slot past the next one, and a
pool named `a}b{c` breaks the `{...}` hash tag its keys share on a Redis Cluster.
"""

from __future__ import annotations

import math
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HOUR_MS = 3_600_000
MAX_DURATION_MS = 366 * 24 * HOUR_MS  # any duration at all
MAX_WINDOW_MS = 31 * 24 * HOUR_MS     # a limit's window: up to a month
MAX_UNITS = 1_000_000_000             # a limit's max, and a fixed cost per call
MAX_MAX_DELAY_MS = 24 * HOUR_MS       # and below the broker's visibility_timeout
MAX_SLOT_MARGIN_MS = 10_000           # and shorter than the tool's shortest window
MIN_LEASE_TIMEOUT_MS = 1_000
MAX_LEASE_TIMEOUT_MS = 24 * HOUR_MS
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # tools, pools and priority classes
NAME_RULE = "lowercase letters, digits and '_', starting with a letter, at most 64"


def check_duration(text: str, ms: int, most_ms: int, least_ms: int = 1) -> int:
    """`ms`, or a ValueError naming the bound `text` breaks."""
    if ms > most_ms:
        raise ValueError(f"{text!r} is longer than the most allowed, {_hours(most_ms)}")
    if ms < least_ms:
        raise ValueError(f"{text!r} is shorter than the least allowed, {least_ms} ms")
    return ms


def check_units(value: float, what: str) -> float:
    """A finite, positive number of units up to MAX_UNITS, or a ValueError saying so."""
    if not (math.isfinite(value) and 0 < value <= MAX_UNITS):
        raise ValueError(f"{what} must be a positive, finite number of units up to "
                         f"{MAX_UNITS:_}, got {value}")
    return value


def check_name(name: str, what: str) -> str:
    """`name` if it may go into a queue name and a Redis hash tag, else a ValueError."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a valid name: use {NAME_RULE} characters "
                         "(it goes into Redis keys and their {hash tag})")
    return name


def _hours(ms: int) -> str:
    return f"{ms // HOUR_MS}h" if ms >= HOUR_MS else f"{ms // 1000}s"


def check_time_zone(value: str) -> str:
    """An IANA time zone name, or a ValueError naming the form."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}; use an IANA name such as "
                         "'Europe/Paris' or 'UTC'") from None
    return value
