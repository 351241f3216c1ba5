"""Read a tools file (TOML, or a parsed mapping) into a `Config`, and find the default one.

Every mistake becomes a `ConfigError` naming the file, the tool and the field, and saying
what is expected (the fields' own rules live with the models in `throttle/config.py`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from throttle import bounds
from throttle.config import Config, PoolConfig, ToolConfig
from throttle.errors import ConfigError
from throttle.limit import format_ms, parse_duration_ms
from throttle.tool_rules import argument_problem, tool_problems

LOCAL_CONFIG = Path("config") / "tools.toml"  # the tools file of the current directory
# The file the deployed workers load when THROTTLE_CONFIG is not set (workers/celery.py).
PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "tools.toml"

_TOP_LEVEL = {"broker", "defaults", "tools", "pools"}
_BROKER_FIELDS = {"visibility_timeout"}


def load_config(
    source: str | Path | Mapping[str, Any], *, import_functions: bool = True,
) -> Config:
    """Load a config from a TOML file path or an already-parsed mapping.

    `import_functions=False` checks the `cost` / `settle` paths without importing their
    modules where it can (`throttle check` does; see throttle.functions).
    """
    if isinstance(source, Mapping):
        return _build(dict(source), "<mapping>", import_functions)
    path = Path(source)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save the file as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; pass the path of a tools TOML file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass the path of a tools TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc)
        if "twice" in detail or "overwrite" in detail:
            raise ConfigError(f"{path}: duplicate tool or field ({detail})") from None
        raise ConfigError(f"{path}: not valid TOML: {detail}") from None
    return _build(raw, str(path), import_functions)


def _build(raw: dict[str, Any], where: str, import_functions: bool = True) -> Config:
    unknown = set(raw) - _TOP_LEVEL
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {sorted(unknown)}; "
            "expected [broker], [defaults], [pools.<name>], [tools.<name>]"
        )
    for section in ("broker", "defaults", "tools", "pools"):
        if not isinstance(raw.get(section, {}), Mapping | list):
            raise ConfigError(f"{where}: [{section}] must be a table")
    broker = dict(raw.get("broker", {}))
    if set(broker) - _BROKER_FIELDS:
        unknown_fields = sorted(set(broker) - _BROKER_FIELDS)
        raise ConfigError(f"{where}: [broker]: unknown field(s) {unknown_fields}")
    try:
        visibility_ms = parse_duration_ms(str(broker.get("visibility_timeout", "1h")))
    except ValueError as exc:
        raise ConfigError(f"{where}: [broker], field 'visibility_timeout': {exc}") from None
    defaults = dict(raw.get("defaults", {}))
    tools_raw = raw.get("tools", {})
    if isinstance(tools_raw, list):
        tools_raw = _tools_from_list(tools_raw, where)
    if not isinstance(tools_raw, Mapping) or not tools_raw:
        raise ConfigError(f"{where}: no tools declared; add a [tools.<name>] table")
    for name, body in tools_raw.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: tool {name!r} must be a table ([tools.{name}])")
    tools = {
        name: _build_tool(name, {**defaults, **body}, where, import_functions)
        for name, body in tools_raw.items()
    }
    pools = _build_pools(raw.get("pools", {}), where)
    for tool in tools.values():
        _check_pool(tool, pools, where)
        if tool.max_delay_ms >= visibility_ms:
            raise ConfigError(
                f"{where}: tool {tool.name!r}, field 'max_delay': {format_ms(tool.max_delay_ms)} "
                f"is at or above the broker's visibility_timeout ({format_ms(visibility_ms)}); "
                "a delayed task would be redelivered; lower max_delay or raise visibility_timeout"
            )
    return Config(tools=tools, pools=pools, visibility_timeout_ms=visibility_ms, source=where)


def _build_pools(raw: Any, where: str) -> dict[str, PoolConfig]:
    pools = {}
    for name, body in dict(raw).items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: pool {name!r} must be a table ([pools.{name}])")
        try:
            bounds.check_name(name, "pool")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        try:
            pools[name] = PoolConfig.model_validate({**body, "name": name})
        except ValidationError as exc:
            raise ConfigError(
                _describe(exc, name, where).replace(f"tool {name!r}", f"pool {name!r}")
            ) from None
    return pools


def _check_pool(tool: ToolConfig, pools: Mapping[str, PoolConfig], where: str) -> None:
    here = f"{where}: tool {tool.name!r}"
    if tool.adaptive and tool.key is not None:
        raise ConfigError(
            f"{here}, field 'adaptive': the tool keeps a window per {tool.key!r} value, but an "
            "upstream reports one limit for the account; put the tool in a pool and set "
            "`adaptive = true` on the pool, or drop `key`")
    if tool.pool is None:
        if tool.priority is not None:
            raise ConfigError(f"{here}, field 'priority': only a tool in a pool has a priority")
        return
    pool = pools.get(tool.pool)
    if pool is None:
        known = ", ".join(sorted(pools)) or "(none)"
        raise ConfigError(f"{here}, field 'pool': unknown pool {tool.pool!r}; known: {known}")
    if tool.quotas and tool.quota_tz != pool.quota_tz:
        raise ConfigError(f"{here}, field 'quota_tz': {tool.quota_tz!r}, but the tools of pool "
                          f"{tool.pool!r} count days in the pool's quota_tz ({pool.quota_tz!r}); "
                          "set quota_tz on the pool instead")
    if pool.fair_by is not None:
        if tool.fair_by is not None:
            raise ConfigError(f"{here}, field 'fair_by': its pool {tool.pool!r} shares by "
                              f"{pool.fair_by!r}; set fair_by on the pool or on its tools, "
                              "not both")
        problem = argument_problem(tool.params, pool.fair_by, "fair share")
        if problem:
            raise ConfigError(f"{here}, field 'params' (pool {tool.pool!r} has fair_by = "
                              f"{pool.fair_by!r}): {problem}")
    if tool.priority not in pool.shares:
        classes = ", ".join(sorted(pool.shares))
        raise ConfigError(
            f"{here}, field 'priority': {tool.priority!r} is not a class of pool "
            f"{tool.pool!r}; its classes: {classes}"
        )


def _tools_from_list(items: list[Any], where: str) -> dict[str, Any]:
    tools: dict[str, Any] = {}
    for item in items:
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            raise ConfigError(f"{where}: every tool needs a 'name'")
        if name in tools:
            raise ConfigError(f"{where}: duplicate tool {name!r}; each tool is declared once")
        tools[name] = {k: v for k, v in item.items() if k != "name"}
    return tools


def _build_tool(name: str, body: dict[str, Any], where: str, import_functions: bool) -> ToolConfig:
    if not bounds.NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: tool {name!r}: the name must be lowercase letters, digits and '_', "
            "starting with a letter (it becomes the queue 'tool.<name>')"
        )
    if "max_delay" not in body:
        raise ConfigError(f"{where}: tool {name!r}, field 'max_delay': required (e.g. \"30s\")")
    try:
        tool = ToolConfig.model_validate({**body, "name": name},
                                         context={"import_functions": import_functions})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, name, where)) from None
    problems = [f"{where}: tool {name!r}, field {field!r}: {problem}"
                for field, problem in tool_problems(tool)]
    if problems:
        raise ConfigError("\n".join(problems))
    return tool


def _describe(exc: ValidationError, tool: str, where: str) -> str:
    lines = []
    internal = ("name", "max_delay_ms", "slot_margin_ms", "fair_horizon_ms")
    fields = sorted([*ToolConfig.model_fields, "max_delay", "slot_margin", "fair_horizon"])
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        if error["type"] == "extra_forbidden":
            known = ", ".join(f for f in fields if f not in internal)
            message = f"unknown field; known fields: {known}"
        elif error["type"] == "missing":
            message = "required"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: tool {tool!r}, field {field!r}: {message}")
    return "\n".join(lines)


def default_config_path() -> Path:
    """THROTTLE_CONFIG, else ./config/tools.toml, else the project's own."""
    configured = os.environ.get("THROTTLE_CONFIG")
    if configured:
        return Path(configured)
    return LOCAL_CONFIG if LOCAL_CONFIG.exists() else PROJECT_CONFIG
