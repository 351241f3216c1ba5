"""What an upstream's answer headers say about its rate limits, in each provider's format.

  OpenAI, Azure   x-ratelimit-{limit,remaining,reset}-{requests,tokens}; resets are
                  durations such as "6m0s", "1s", "12ms" or "8.64s"
  Anthropic       anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
                  {limit,remaining,reset}; resets are RFC 3339 times
                  ("2026-12-04T10:00:30Z")
  any             retry-after-ms (milliseconds), Retry-After (seconds or an HTTP date)

A value that does not parse (Azure's "-1", a typo) is left out with a debug log: reading
headers never fails the call that brought them. Pure functions, no I/O.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

logger = logging.getLogger("throttle.adaptive")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
EPOCH_THRESHOLD_S = 1e9  # a bare reset value above this is a Unix time, not a delay


@dataclass(frozen=True, slots=True)
class Reading:
    """One limit as the upstream reports it (None where it says nothing)."""

    limit: float | None = None
    remaining: float | None = None
    reset_s: float | None = None  # seconds until it is full again

    @property
    def empty(self) -> bool:
        return self.limit is None and self.remaining is None and self.reset_s is None


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """Requests and tokens limits of one answer, and the pause it asks for."""

    requests: Reading = Reading()
    tokens: Reading = Reading()
    retry_after_s: float | None = None

    def of(self, kind: str) -> Reading:
        """The reading of `kind`: 'requests' or 'tokens'."""
        return self.tokens if kind == "tokens" else self.requests


def duration_s(text: str) -> float:
    """Seconds in a duration like "6m0s", "1.5s", "250ms", "1h2m3s" or a bare "3" (seconds)."""
    value = text.strip()
    try:
        return _non_negative(float(value), text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"{text!r} is not a duration such as '6m0s', '1.5s' or '250ms'")
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def retry_after_s(value: str, *, now_s: float | None = None) -> float:
    """Seconds to wait from a Retry-After value: delay seconds or an HTTP date."""
    text = value.strip()
    try:
        return _non_negative(float(text), value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        raise ValueError(f"Retry-After {value!r} is neither seconds nor an HTTP date") from None
    return max(0.0, when.timestamp() - _now(now_s))


def reset_s(value: str, *, now_s: float | None = None) -> float:
    """Seconds until a reset: a duration (OpenAI), a Unix time or an RFC 3339 time."""
    try:
        seconds = duration_s(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"reset {value!r} is neither a duration nor an RFC 3339 time"
                             ) from None
        if when.tzinfo is None:
            raise ValueError(f"reset {value!r} has no time zone") from None
        return max(0.0, when.timestamp() - _now(now_s))
    if seconds > EPOCH_THRESHOLD_S:
        return max(0.0, seconds - _now(now_s))
    return seconds


def read_limits(headers: Mapping[str, str], *, now_s: float | None = None) -> UpstreamLimits:
    """The limits `headers` report (any of the formats above; case does not matter)."""
    lower = {str(name).lower(): str(value) for name, value in headers.items()}
    requests = _reading(lower, "x-ratelimit-{}-requests", now_s)
    tokens = _reading(lower, "x-ratelimit-{}-tokens", now_s)
    if requests.empty:
        requests = _reading(lower, "anthropic-ratelimit-requests-{}", now_s)
    if tokens.empty:
        tokens = _reading(lower, "anthropic-ratelimit-tokens-{}", now_s)
    if tokens.empty:  # accounts limited on input tokens report those (the binding side)
        tokens = _reading(lower, "anthropic-ratelimit-input-tokens-{}", now_s)
    return UpstreamLimits(requests, tokens, pause_asked_s(lower, now_s=now_s))


def pause_asked_s(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """retry-after-ms, else Retry-After, in seconds; None when neither parses."""
    lower = {str(name).lower(): str(value) for name, value in headers.items()}
    if "retry-after-ms" in lower:
        parsed = _parsed(lower["retry-after-ms"], "retry-after-ms",
                         lambda text: _non_negative(float(text), text) / 1000)
        if parsed is not None:
            return parsed
    if "retry-after" in lower:
        return _parsed(lower["retry-after"], "retry-after",
                       lambda text: retry_after_s(text, now_s=now_s))
    return None


def _reading(lower: Mapping[str, str], pattern: str, now_s: float | None) -> Reading:
    def number(text: str) -> float:
        return _non_negative(float(text), text)

    names = {part: pattern.format(part) for part in ("limit", "remaining", "reset")}
    found = {part: lower[name] for part, name in names.items() if name in lower}
    limit = _parsed(found.get("limit"), names["limit"], number)
    if limit == 0:
        limit = None  # no upstream limits to zero: read as not reported
    return Reading(
        limit=limit,
        remaining=_parsed(found.get("remaining"), names["remaining"], number),
        reset_s=_parsed(found.get("reset"), names["reset"],
                        lambda text: reset_s(text, now_s=now_s)),
    )


def _parsed(value: str | None, name: str, parse: Callable[[str], float]) -> float | None:
    if value is None:
        return None
    try:
        return float(parse(value))
    except (ValueError, OverflowError) as exc:
        logger.debug("upstream header %s=%r ignored: %s", name, value, exc)
        return None


def _now(now_s: float | None) -> float:
    return time.time() if now_s is None else now_s


def _non_negative(value: float, text: str) -> float:
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a non-negative number")
    return value
