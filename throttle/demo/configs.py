"""The demo's config: only the tools the seed's scenario calls, with time scaled.

The default limits are per minute, so the demo scales time: `scale_config` divides every
window (the tools' and the pools') and max_delay by the time scale ("100/60s" at 10x becomes
"100/6s").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from throttle.demo.seed import DEMO_TOOLS, LLM_TOOL
from throttle.limit import Limit, format_ms, parse_duration_ms


def demo_tools_only(raw: Mapping[str, Any], *, llm: bool = True) -> dict[str, Any]:
    """A parsed tools file with only the tools the scenario calls and the pools they use.

    Other tools would only add idle workers and empty rows; the LLM tool stays when `llm`
    is on. A file declaring none of the demo's tools is returned whole, for the runner to
    report.
    """
    document = dict(raw)
    tools, pools = raw.get("tools"), raw.get("pools")
    if not isinstance(tools, Mapping) or not any(name in DEMO_TOOLS for name in tools):
        return document
    wanted = (*DEMO_TOOLS, LLM_TOOL) if llm else DEMO_TOOLS
    kept = {name: body for name, body in tools.items() if name in wanted}
    defaults = raw.get("defaults", {})
    defaults = defaults if isinstance(defaults, Mapping) else {}
    used = {{**defaults, **body}.get("pool") for body in kept.values() if isinstance(body, Mapping)}
    document["tools"] = kept
    if isinstance(pools, Mapping):
        document["pools"] = {name: pool for name, pool in pools.items() if name in used}
    return document


def scale_config(raw: Mapping[str, Any], time_scale: float) -> dict[str, Any]:
    """A copy of a parsed tools file with every window (of the tools and of the pools) and
    every max_delay divided by `time_scale`.

    Values that do not parse are left as they are, for `load_config` to report.
    """
    document = copy.deepcopy(dict(raw))
    tools = document.get("tools", {})
    pools = document.get("pools", {})
    tables = [document.get("defaults", {})]
    tables += list(tools.values()) if isinstance(tools, Mapping) else list(tools)
    tables += list(pools.values()) if isinstance(pools, Mapping) else []
    for table in tables:
        if not isinstance(table, dict):
            continue
        try:
            if "limits" in table:
                limits = table["limits"]
                items = [limits] if isinstance(limits, str) else list(limits)
                table["limits"] = [_scale_limit(str(item), time_scale) for item in items]
            if "max_delay" in table:
                table["max_delay"] = _scale_duration(table["max_delay"], time_scale)
        except (TypeError, ValueError):
            continue
    return document


def _scale_limit(text: str, time_scale: float) -> str:
    limit = Limit.parse(text)
    return f"{limit.max}/{_ms_text(limit.window_ms / time_scale)}"


def _scale_duration(value: Any, time_scale: float) -> str:
    ms = value if isinstance(value, int) else parse_duration_ms(str(value))
    return _ms_text(ms / time_scale)


def _ms_text(ms: float) -> str:
    return format_ms(max(1, round(ms)))


def share_fairly(raw: Mapping[str, Any], argument: str) -> dict[str, Any]:
    """A copy of a parsed tools file whose tools that require `argument` share their limits
    fairly by it (`fair_by` on each such tool: the tools' own limits bind before their
    pool's, and each tool's slot already waits for the pool's)."""
    document = copy.deepcopy(dict(raw))
    tools = document.get("tools", {})
    for tool in tools.values() if isinstance(tools, Mapping) else []:
        params = tool.get("params") if isinstance(tool, dict) else None
        if isinstance(params, Mapping) and argument in (params.get("required") or []):
            tool["fair_by"] = argument
    return document
