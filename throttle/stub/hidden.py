"""The stub's hidden limits: requests and tokens per sliding window that it enforces itself
(a real upstream's limits, unknown to the tools file), reported in its answers' headers in
OpenAI's or Anthropic's format (or not at all), with a 429 past them. As the real APIs do,
a 429 carries `retry-after` in whole seconds (OpenAI's also `retry-after-ms`), and
Anthropic's reset times are RFC 3339 in whole seconds, rounded up.

A request is counted when it arrives, with the tokens its answer uses (prompt + completion,
the `usage` the worker settles to).
"""

from __future__ import annotations

import math
from collections import deque
from datetime import UTC, datetime
from typing import Literal

LimitHeaders = Literal["openai", "anthropic", "none"]


def go_duration(seconds: float) -> str:
    """Seconds as the duration text OpenAI sends: "6m0s", "1.5s", "250ms"."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    return f"{int(hours)}h{text}" if hours else text


class HiddenLimits:
    """Sliding-window logs of what the stub served, checked against its hidden limits."""

    def __init__(self) -> None:
        self.log: deque[tuple[float, int]] = deque()  # (arrival s, tokens)

    def check(self, now_s: float, tokens: int, requests_max: int, tokens_max: int,
              window_s: float, style: LimitHeaders) -> tuple[bool, dict[str, str]]:
        """(served, headers): whether the request fits, counted if it does, and the headers
        saying what remains."""
        while self.log and self.log[0][0] <= now_s - window_s:
            self.log.popleft()
        used_requests, used_tokens = len(self.log), sum(t for _, t in self.log)
        fits = (not requests_max or used_requests + 1 <= requests_max) and (
            not tokens_max or used_tokens + tokens <= tokens_max)
        if fits:
            self.log.append((now_s, tokens))
            used_requests, used_tokens = used_requests + 1, used_tokens + tokens
        # Room comes back as the oldest entry leaves the window.
        reset_s = max(0.001, self.log[0][0] + window_s - now_s) if self.log else 0.001
        readings = {}
        if requests_max:
            readings["requests"] = (requests_max, max(0, requests_max - used_requests))
        if tokens_max:
            readings["tokens"] = (tokens_max, max(0, tokens_max - used_tokens))
        headers = limit_headers(readings, reset_s, now_s, style)
        if not fits and style == "openai":
            headers["retry-after-ms"] = f"{reset_s * 1000:.0f}"
        if not fits and style != "none":  # whole seconds, never shorter than the wait
            headers["retry-after"] = str(max(1, math.ceil(reset_s)))
        return fits, headers


def limit_headers(readings: dict[str, tuple[int, int]], reset_s: float, now_s: float,
                  style: LimitHeaders) -> dict[str, str]:
    """{kind: (limit, remaining)} as `style` writes it."""
    headers: dict[str, str] = {}
    for kind, (limit, remaining) in readings.items():
        if style == "openai":
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = go_duration(round(reset_s, 3))
        elif style == "anthropic":  # whole seconds, rounded up as the API's are
            at = datetime.fromtimestamp(math.ceil(now_s + reset_s), UTC).isoformat()
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
            headers[f"anthropic-ratelimit-{kind}-reset"] = at.replace("+00:00", "Z")
    return headers
