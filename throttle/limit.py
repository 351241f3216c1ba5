"""Durations and limits as written in a tools file: "30s", "100/60s", "10000/1d".

Durations carry their unit and are held in milliseconds; every value is bounded
(throttle/bounds.py), so no limit reaches the gate that it cannot keep.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from throttle import bounds

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_DURATION = re.compile(r"\s*(-?\d+(?:\.\d+)?)?\s*([A-Za-z]*)\s*")
DAY_MS = 86_400_000


def parse_duration_ms(text: str) -> int:
    """Parse "500ms", "30s", "2m", "1h" (a bare unit means one of it) into milliseconds."""
    match = _DURATION.fullmatch(text)
    if not match or not match.group(2):
        raise ValueError(f"{text!r} is not a duration; expected a number and a unit, e.g. '30s'")
    number, unit = match.group(1), match.group(2)
    if unit not in _UNITS_MS:
        raise ValueError(f"unknown unit {unit!r} in {text!r}; expected one of ms, s, m, h")
    value = float(number) if number else 1.0
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    if value * _UNITS_MS[unit] < 1:
        raise ValueError(f"{text!r} is below the 1ms resolution; use at least '1ms'")
    return bounds.check_duration(text, round(value * _UNITS_MS[unit]), bounds.MAX_DURATION_MS)


class Limit(BaseModel):
    """At most `max` units in every interval of `window_ms` milliseconds."""

    model_config = ConfigDict(frozen=True)

    max: int
    window_ms: int
    calendar: bool = False  # a quota per calendar day ("10000/1d"), not a sliding window

    @classmethod
    def parse(cls, text: str) -> Limit:
        """Parse "100/60s" (or "10/s") into a Limit; "10000/1d" is a calendar-day quota."""
        head, sep, window = text.partition("/")
        if not sep:
            raise ValueError(f"{text!r} is not a limit; expected 'max/window', e.g. '100/60s'")
        try:
            count = int(head.strip())
        except ValueError:
            raise ValueError(f"{text!r}: max {head.strip()!r} must be a whole number") from None
        if count <= 0:
            raise ValueError(f"{text!r}: max must be a positive whole number, got {count}")
        if count > bounds.MAX_UNITS:
            raise ValueError(f"{text!r}: max must be at most {bounds.MAX_UNITS:_}")
        if window.strip().endswith("d"):
            if window.strip() not in ("1d", "d"):
                raise ValueError(f"{text!r}: a quota resets every calendar day ('1d'); for "
                                 "longer spans use a sliding window in hours, e.g. '48h'")
            return cls(max=count, window_ms=DAY_MS, calendar=True)
        window_ms = bounds.check_duration(window.strip(), parse_duration_ms(window),
                                          bounds.MAX_WINDOW_MS)
        return cls(max=count, window_ms=window_ms)

    def __str__(self) -> str:
        return f"{self.max}/1d" if self.calendar else f"{self.max}/{format_ms(self.window_ms)}"


def format_ms(ms: int) -> str:
    """Milliseconds as the shortest exact duration text: 60000 -> "1m", 1500 -> "1500ms"."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
