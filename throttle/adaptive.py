"""Adaptive limits: a pool's (or tool's) effective limit, learned from the upstream's answers.

With `adaptive = true` on a pool or tool, a tool body hands each upstream answer's headers
to throttle with `report_headers(response.headers, status=response.status_code)`. After the
body, the worker sends what they say (throttle/upstream_headers.py: limit and remaining, of
requests or tokens, whichever the target counts) to adapt.lua, which keeps the effective
limit in the target's live-limits hash, where acquire.lua reads it in the same call as
every decision: never above the file's limit or an operator's override, lowered at once
when the upstream reports a lower limit or less remaining than the gate counts, raised
back as it reports more. Answers without those headers move it by their status: a 429 cuts
it BACKOFF below the level the upstream refused at, answers without one bring it back to
that level over APPROACH_WINDOWS windows, then probe above it, PROBE_SHARE of it at
first, each window's step PROBE_GROWTH times the last; a 429 as a window turns over (calls
reaching the upstream later than the slot margin allows) stretches the learned limit's
windows by REACH_STEP_MS (adapt.lua). A learned limit not confirmed for KEEP_WINDOWS
windows lapses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from throttle.config import Config, ToolConfig
from throttle.errors import ConfigError
from throttle.keys import adaptive_fields, keys_for, overrides_key, pool_overrides_key
from throttle.limit import Limit
from throttle.overrides import encode
from throttle.scripts import load_script
from throttle.store import StoreClient, StoreErrors
from throttle.upstream_headers import read_limits

logger = logging.getLogger("throttle.adaptive")

BACKOFF = 0.1  # a 429 without headers cuts the limit this share below where it came
APPROACH_WINDOWS = 1  # windows to climb back to that level before probing above it
PROBE_SHARE = 0.05  # the first probe above it, a share of it ...
PROBE_GROWTH = 3.0  # ... each window's step this many times the last one's
FLOOR_SHARE = 0.05  # the effective limit never goes under this share of the ceiling
SLACK_SHARE = 0.02  # remaining may fall this short of the gate's count before it lowers
HOLD_WINDOWS = 1.0  # after a 429 cut, other 429s within this many windows are the same one
REACH_STEP_MS = 25.0  # a 429 as a window turns over stretches the learned windows this much
REACH_MAX_MS = 250.0  # (at most 2.5% of the longest window), up to this (at most 10% of it)
KEEP_WINDOWS = 10  # a learned limit lapses after this many windows without an answer
MIN_KEEP_MS = 60_000


@dataclass(frozen=True, slots=True)
class Answer:
    """One upstream answer as a tool body reported it."""

    headers: dict[str, str]
    status: int


_answers: ContextVar[list[Answer] | None] = ContextVar("throttle_answers", default=None)


def report_headers(headers: Mapping[str, str], *, status: int = 200) -> None:
    """Hand an upstream answer's headers (and HTTP status) to throttle, from a tool body.

    The worker reports them to the gate after the body. Outside a throttled call (a direct
    call, a test) this does nothing.
    """
    answers = _answers.get()
    if answers is None:
        logger.debug("report_headers outside a throttled call: ignored")
        return
    answers.append(Answer({str(k): str(v) for k, v in headers.items()}, int(status)))


class collecting:  # (lower case: used as the function it was, `with collecting(answers):`)
    """Gather into `answers` what `report_headers` receives while the block runs.

    (A class, not a generator: every call of a tool enters it, and this costs a tenth.)
    """

    __slots__ = ("_answers", "_token")

    def __init__(self, answers: list[Answer]) -> None:
        self._answers = answers

    def __enter__(self) -> list[Answer]:
        self._token = _answers.set(self._answers)
        return self._answers

    def __exit__(self, *_: object) -> None:
        _answers.reset(self._token)


@dataclass(frozen=True, slots=True)
class Target:
    """A pool or tool whose limit adapts, and where its state lives."""

    field: str  # 'pool' or 'tool:<name>'
    label: str  # 'pool llm_tokens', 'tool search'
    limits_key: str
    log: str
    cost: str
    configured: tuple[Limit, ...]
    kind: str  # 'tokens' or 'requests': what its units count

    @property
    def window_ms(self) -> int:
        return max(limit.window_ms for limit in self.configured)

    @property
    def configured_max(self) -> float:
        return max(self.configured, key=lambda limit: limit.window_ms).max


def targets(config: Config, prefix: str, tool: ToolConfig) -> list[Target]:
    """The adaptive targets a call of `tool` reports to: its pool's, its own."""
    found = []
    keys = keys_for(prefix, tool)
    pool = config.pools.get(tool.pool) if tool.pool else None
    if pool is not None and pool.adaptive and keys.pool_log and keys.pool_cost:
        weighted = any(t.cost != 1 for t in config.tools.values() if t.pool == pool.name)
        found.append(Target("pool", f"pool {pool.name}", pool_overrides_key(prefix, pool.name),
                            keys.pool_log, keys.pool_cost, pool.limits,
                            "tokens" if weighted else "requests"))
    if tool.adaptive:
        found.append(Target(f"tool:{tool.name}", f"tool {tool.name}",
                            overrides_key(prefix, tool), keys.log, keys.cost, tool.limits,
                            "tokens" if tool.cost != 1 else "requests"))
    return found


def all_targets(config: Config, prefix: str) -> list[Target]:
    """Every adaptive target of the config, each once."""
    seen: dict[str, Target] = {}
    for tool in config.tools.values():
        for target in targets(config, prefix, tool):
            seen.setdefault(target.label, target)
    return sorted(seen.values(), key=lambda target: target.label)


@dataclass(frozen=True, slots=True)
class AdaptiveState:
    """A target's limit of its longest window: configured (or overridden) and effective."""

    target: str
    window_ms: int
    configured: float
    effective: float
    reason: str  # why it last moved: 'headers: limit 60', '429', 'raised', ''
    changed_at_s: float | None


class Adapter:
    """Sends the answers of one call to adapt.lua, for each adaptive target of its tool."""

    def __init__(self, client: StoreClient, config: Config, prefix: str,
                 errors: StoreErrors) -> None:
        self.client, self.config, self.prefix, self._errors = client, config, prefix, errors
        self._script = client.register_script(load_script("adapt"))
        self._targets = {name: targets(config, prefix, tool)
                         for name, tool in config.tools.items()}

    def adapts(self, tool: str) -> bool:
        """Whether calls of `tool` report to an adaptive target."""
        return bool(self._targets.get(tool))

    def report(self, tool: str, answers: Sequence[Answer], *, busy: bool = False,
               member: str | None = None, now_s: float | None = None) -> list[AdaptiveState]:
        """Move the effective limits of `tool`'s targets after one call; their new states.

        `busy`: the call ended with a 429 (UpstreamBusy) even if no answer was reported.
        `member`: the call's member at the gate; without headers, a served call's place in
        the windows tells what the upstream served (the calls admitted before it).
        """
        tool_config = self.config.tool(tool)
        found = self._targets.get(tool) or targets(self.config, self.prefix, tool_config)
        if not found:
            return []
        with_headers = [answer for answer in answers if answer.headers]
        limits = read_limits(with_headers[-1].headers) if with_headers else read_limits({})
        busy = busy or any(answer.status == 429 for answer in answers)
        states = []
        for target in found:
            reading = limits.of(target.kind)
            pause_ms = (limits.retry_after_s or reading.reset_s or 0) * 1000
            hold_ms = max(pause_ms, HOLD_WINDOWS * target.window_ms)
            keep_ms = max(MIN_KEEP_MS, KEEP_WINDOWS * target.window_ms)
            args = [target.field, "" if now_s is None else f"{now_s * 1000:.3f}",
                    encode(target.configured), "1" if busy else "0",
                    _number(reading.limit), _number(reading.remaining), hold_ms, BACKOFF,
                    APPROACH_WINDOWS, FLOOR_SHARE, keep_ms, SLACK_SHARE,
                    tool_config.slot_margin_ms / 2, PROBE_SHARE, PROBE_GROWTH,
                    "" if reading.reset_s is None else reading.reset_s * 1000,
                    member or "", REACH_STEP_MS, REACH_MAX_MS]
            with self._errors:
                raw = self._script(keys=[target.limits_key, target.log, target.cost],
                                   args=args)
            effective, ceiling, reason = (_text(value) for value in raw)
            states.append(AdaptiveState(target.label, target.window_ms, float(ceiling),
                                        float(effective), reason, now_s))
        return states


def read_states(client: StoreClient, config: Config, prefix: str, *,
                now_s: float | None = None) -> list[AdaptiveState]:
    """Every adaptive target's configured and effective limit, and why it last moved."""
    now_ms = (time.time() if now_s is None else now_s) * 1000
    found = all_targets(config, prefix)
    if not found:
        return []
    pipe = client.pipeline(transaction=False)
    for target in found:
        pipe.hget(target.limits_key, adaptive_fields(target.field)[1])
        pipe.hget(target.limits_key, target.field)
    raw = pipe.execute()
    states = []
    for i, target in enumerate(found):
        state, override = raw[2 * i], raw[2 * i + 1]
        ceiling = target.configured_max
        if override is not None:
            ceiling = _override_max(_text(override), target.window_ms, ceiling)
        record: dict[str, Any] = {}
        if state is not None:
            with contextlib.suppress(ValueError):
                record = json.loads(_text(state))
        changed_ms = record.get("changed_ms")
        seen_ms = float(record.get("seen_ms") or 0)
        keep_ms = max(MIN_KEEP_MS, KEEP_WINDOWS * target.window_ms)
        effective = float(record.get("effective") or ceiling)
        if seen_ms and now_ms - seen_ms >= keep_ms:
            effective = ceiling  # lapsed: acquire.lua no longer reads it
        states.append(AdaptiveState(
            target.label, target.window_ms, ceiling, min(effective, ceiling),
            str(record.get("reason") or ""),
            None if changed_ms is None else float(changed_ms) / 1000))
    return states


def forget(client: StoreClient, config: Config, prefix: str, *, tool: str | None = None,
           pool: str | None = None) -> bool:
    """Drop the limit learned for `tool` or `pool` at once (the file's or an override's
    applies from the next decision); False if none was learned. ConfigError if it does not
    adapt."""
    found = {target.label: target for target in all_targets(config, prefix)}
    known = ", ".join(found) or "none"
    if (tool is None) == (pool is None):
        raise ConfigError(f"name one tool or one --pool whose learned limit to forget "
                          f"(adaptive: {known})")
    label = f"pool {pool}" if pool is not None else f"tool {tool}"
    if label not in found:
        raise ConfigError(f"{label} has no adaptive limit (adaptive: {known}); name a tool "
                          "or --pool with `adaptive = true`")
    target = found[label]
    return int(client.hdel(target.limits_key, *adaptive_fields(target.field))) > 0


def _override_max(text: str, window_ms: int, default: float) -> float:
    parts = text.split()
    for max_text, window_text in zip(parts[::2], parts[1::2], strict=False):
        if float(window_text) == window_ms:
            return float(max_text)
    return max(float(m) for m in parts[::2]) if parts else default


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
