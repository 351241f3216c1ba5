"""How long an upstream asked us to pause, read from its response headers.

  retry-after-ms                    milliseconds (OpenAI, Azure)
  Retry-After                       seconds, or an HTTP date (RFC 9110)
  x-ratelimit-reset-<requests|tokens|...>   a duration such as "6m0s", "1.5s" or "250ms";
                                    only the limits whose x-ratelimit-remaining-* is 0
                                    count when the upstream says which ran out

Pure functions over throttle.upstream_headers' parsers: the LLM tool turns the answer into
`UpstreamBusy(seconds, ...)`.
"""

from __future__ import annotations

from collections.abc import Mapping

from throttle.upstream_headers import duration_s, pause_asked_s, reset_s, retry_after_s

_RESET = "x-ratelimit-reset-"
_REMAINING = "x-ratelimit-remaining-"

__all__ = ["duration_s", "pause_s", "retry_after_s"]


def pause_s(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """The pause the headers ask for, in seconds; None when they name none that parses."""
    lower = {name.lower(): value for name, value in headers.items()}
    asked = pause_asked_s(lower, now_s=now_s)
    return asked if asked is not None else _reset_s(lower, now_s)


def _reset_s(lower: Mapping[str, str], now_s: float | None) -> float | None:
    resets: dict[str, float] = {}
    for name, value in lower.items():
        if name.startswith(_RESET):
            try:
                resets[name.removeprefix(_RESET)] = reset_s(value, now_s=now_s)
            except ValueError:
                continue
    if not resets:
        return None
    exhausted = [
        seconds for kind, seconds in resets.items()
        if lower.get(_REMAINING + kind, "").strip() in ("0", "0.0")
    ]
    return max(exhausted or resets.values())
