"""How long an upstream asked us to pause, read from its response headers.

  retry-after-ms                    milliseconds (OpenAI, Azure)
  Retry-After                       seconds, or an HTTP date (RFC 9110)
  x-ratelimit-reset-<requests|tokens|...>   a duration such as "6m0s", "1.5s" or "250ms";
                                    only the limits whose x-ratelimit-remaining-* is 0
                                    count when the upstream says which ran out

Pure functions: the LLM tool turns the answer into `UpstreamBusy(seconds, ...)`.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_RESET = "x-ratelimit-reset-"
_REMAINING = "x-ratelimit-remaining-"
EPOCH_THRESHOLD_S = 1e9  # a bare reset value above this is a Unix time, not a delay


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
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


def pause_s(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """The pause the headers ask for, in seconds; None when they name none that parses."""
    lower = {name.lower(): value for name, value in headers.items()}
    if "retry-after-ms" in lower:
        try:
            return _non_negative(float(lower["retry-after-ms"]), lower["retry-after-ms"]) / 1000
        except ValueError:
            pass
    if "retry-after" in lower:
        try:
            return retry_after_s(lower["retry-after"], now_s=now_s)
        except ValueError:
            pass
    return _reset_s(lower, now_s)


def _reset_s(lower: Mapping[str, str], now_s: float | None) -> float | None:
    resets: dict[str, float] = {}
    for name, value in lower.items():
        if name.startswith(_RESET):
            try:
                resets[name.removeprefix(_RESET)] = _reset_value_s(value, now_s)
            except ValueError:
                continue
    if not resets:
        return None
    exhausted = [
        seconds for kind, seconds in resets.items()
        if lower.get(_REMAINING + kind, "").strip() in ("0", "0.0")
    ]
    return max(exhausted or resets.values())


def _reset_value_s(value: str, now_s: float | None) -> float:
    seconds = duration_s(value)
    if seconds > EPOCH_THRESHOLD_S:  # a Unix time
        return max(0.0, seconds - (time.time() if now_s is None else now_s))
    return seconds


def _non_negative(value: float, text: str) -> float:
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a non-negative number of seconds")
    return value
