"""Load `config/*.toml` into frozen, validated objects.

Every mistake becomes a `ConfigError` naming the file, the tool and the field, and saying
what is expected. Durations are written with units ("500ms", "30s", "2m", "1h") and held in
milliseconds (`window_ms`, `max_delay_ms`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from throttle import bounds
from throttle.errors import ConfigError
from throttle.functions import check_function_path, load_function
from throttle.limit import Limit, format_ms, parse_duration_ms
from throttle.tool_rules import argument_problem, tool_problems

DEFAULT_VISIBILITY_TIMEOUT_MS = 3_600_000
LOCAL_CONFIG = Path("config") / "tools.toml"  # the tools file of the current directory
# The file the deployed workers load when THROTTLE_CONFIG is not set (workers/celery.py).
PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "tools.toml"
DEFAULT_SLOT_MARGIN_MS = 40


class ToolConfig(BaseModel):
    """One tool: its limits, deadline, store-outage policy, schemas and fallback."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    limits: tuple[Limit, ...]
    quotas: tuple[Limit, ...] = ()  # calendar-day quotas, written among the limits as "N/1d"
    quota_tz: str = "UTC"  # the time zone whose midnight resets the quotas
    key: str | None = None
    max_delay_ms: int = Field(alias="max_delay")
    on_store_error: Literal["fallback", "delay", "admit"] = "fallback"
    pace: Literal["earliest", "even"] = "earliest"
    slot_margin_ms: int = Field(default=DEFAULT_SLOT_MARGIN_MS, alias="slot_margin", ge=0)
    max_args_bytes: int = Field(default=65_536, gt=0)
    max_redeliveries: int = Field(default=3, ge=0)
    pool: str | None = None
    priority: str | None = None
    cost: float | str = 1
    settle: str | None = None
    concurrency: int | None = Field(default=None, gt=0)
    adaptive: bool = False  # learn the upstream's real limit from its answers (adaptive.py)
    lease_timeout_ms: int = Field(default=60_000, alias="lease_timeout")
    params: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    result: dict[str, Any] = Field(default_factory=dict)
    fallback: Any = None
    fair_by: str | None = None  # share the limits among this argument's values (fairness.py)
    fair_weights: dict[str, float] = Field(default_factory=dict)
    fair_horizon_ms: int | None = Field(default=None, alias="fair_horizon")

    @model_validator(mode="before")
    @classmethod
    def _default_slot_margin(cls, data: Any) -> Any:
        """Unless set: 40 ms, or 2% of the shortest window when that is less (so a 1 s
        window keeps 98% of its rate for delayed calls)."""
        if not isinstance(data, dict):
            return data
        try:
            limits = cls._parse_limits(data.get("limits"))
        except (ValueError, TypeError):
            return data  # the limits' own validator reports the mistake
        data = _split_quotas(data, limits)
        limits = tuple(limit for limit in limits if not limit.calendar)
        if "slot_margin" in data or not limits:
            return data
        shortest = min(limit.window_ms for limit in limits)
        return {**data, "slot_margin": f"{min(DEFAULT_SLOT_MARGIN_MS, shortest // 50)}ms"}

    @field_validator("limits", mode="before")
    @classmethod
    def _parse_limits(cls, value: Any) -> tuple[Limit, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items:
            raise ValueError("expected one or more limits, e.g. [\"100/60s\", \"10/1s\"] (a "
                             "daily quota such as \"10000/1d\" needs a sliding limit beside it)")
        return tuple(item if isinstance(item, Limit) else Limit.parse(str(item)) for item in items)

    _check_quota_tz = field_validator("quota_tz")(bounds.check_time_zone)

    @field_validator("max_delay_ms", mode="before")
    @classmethod
    def _parse_max_delay(cls, value: Any) -> int:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} needs a unit; write it as a string such as \"30s\"")
        return bounds.check_duration(value, parse_duration_ms(value), bounds.MAX_MAX_DELAY_MS)

    @field_validator("lease_timeout_ms", mode="before")
    @classmethod
    def _parse_lease_timeout(cls, value: Any) -> int:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} needs a unit; write it as a string such as \"60s\"")
        return bounds.check_duration(value, parse_duration_ms(value),
                                     bounds.MAX_LEASE_TIMEOUT_MS, bounds.MIN_LEASE_TIMEOUT_MS)

    @field_validator("fair_horizon_ms", mode="before")
    @classmethod
    def _parse_fair_horizon(cls, value: Any) -> int:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} needs a unit; write it as a string such as \"500ms\"")
        return bounds.check_duration(value, parse_duration_ms(value), bounds.MAX_WINDOW_MS)

    @field_validator("fair_weights")
    @classmethod
    def _check_fair_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for tenant, weight in value.items():
            bounds.check_units(weight, f"the weight of {tenant!r}")
        return value

    @field_validator("cost", "settle")
    @classmethod
    def _check_cost(cls, value: float | str | None, info: ValidationInfo) -> float | str | None:
        """A number of units, or a 'module:function' path (imported only when the context
        says `import_functions`, as the workers' loading does)."""
        if isinstance(value, str):
            check_function_path(value, import_it=bool((info.context or {}).get(
                "import_functions", True)))
        elif value is not None:
            bounds.check_units(value, "a fixed cost (or 'module:function')")
        return value

    @field_validator("slot_margin_ms", mode="before")
    @classmethod
    def _parse_slot_margin(cls, value: Any) -> int:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} needs a unit; write it as a string such as \"40ms\"")
        if value.strip() in ("0", "0ms", "0s"):
            return 0
        return bounds.check_duration(value, parse_duration_ms(value), bounds.MAX_SLOT_MARGIN_MS)

    @field_validator("params", "result")
    @classmethod
    def _check_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value

    @property
    def longest_window_ms(self) -> int:
        """The longest window among the tool's limits."""
        return max(limit.window_ms for limit in self.limits)

    @property
    def queue(self) -> str:
        """The Celery queue that carries this tool's calls."""
        return f"tool.{self.name}"

    @property
    def takes_chat(self) -> bool:
        """Whether the task takes chat-completion arguments (its params declare messages):
        the LLM tool's body serves it, and the gateway may send requests to it."""
        properties = self.params.get("properties")
        return isinstance(properties, Mapping) and "messages" in properties

    def units(self, arguments: Mapping[str, Any]) -> float:
        """What one call with these arguments costs, in the units of its limits and pool."""
        if isinstance(self.cost, str):
            return float(load_function(self.cost)(dict(arguments)))
        return float(self.cost)

    def settled_units(self, arguments: Mapping[str, Any], result: Any) -> float | None:
        """What the call really cost, from its result (None when the tool sets no `settle`)."""
        if self.settle is None:
            return None
        return float(load_function(self.settle)(dict(arguments), result))


class PoolConfig(BaseModel):
    """A budget shared by several tools, with a share of it per priority class."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    limits: tuple[Limit, ...]
    quotas: tuple[Limit, ...] = ()  # daily quotas of the whole pool ("N/1d" among its limits)
    quota_tz: str = "UTC"  # the time zone whose midnight resets them (and its tools' quotas)
    shares: dict[str, float]
    adaptive: bool = False  # learn the upstream's real limit from its answers (adaptive.py)
    fair_by: str | None = None  # every tool of the pool has this argument (fairness.py)
    fair_weights: dict[str, float] = Field(default_factory=dict)
    fair_horizon_ms: int | None = Field(default=None, alias="fair_horizon")

    _parse_limits = field_validator("limits", mode="before")(
        ToolConfig._parse_limits.__func__  # type: ignore[attr-defined]
    )
    _check_quota_tz = field_validator("quota_tz")(bounds.check_time_zone)
    _parse_fair_horizon = field_validator("fair_horizon_ms", mode="before")(
        ToolConfig._parse_fair_horizon.__func__  # type: ignore[attr-defined]
    )
    _check_fair_weights = field_validator("fair_weights")(
        ToolConfig._check_fair_weights.__func__  # type: ignore[attr-defined]
    )

    @model_validator(mode="before")
    @classmethod
    def _quotas_apart(cls, data: Any) -> Any:
        """Daily quotas ("N/1d") written among the limits go to `quotas`."""
        if not isinstance(data, dict):
            return data
        try:
            return _split_quotas(data, cls._parse_limits(data.get("limits")))
        except (ValueError, TypeError):
            return data  # the limits' own validator reports the mistake

    @field_validator("shares")
    @classmethod
    def _check_shares(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("expected a share per priority class, e.g. { critical = 1.0 }")
        for name, share in value.items():
            bounds.check_name(name, "priority class")
            if not 0 < share <= 1:
                raise ValueError(f"share of {name!r} must be in (0, 1], got {share}")
        return value


class Config(BaseModel):
    """All tools, keyed by name, and the broker settings they must respect."""

    model_config = ConfigDict(frozen=True)

    tools: Mapping[str, ToolConfig]
    pools: Mapping[str, PoolConfig] = Field(default_factory=dict)
    visibility_timeout_ms: int = DEFAULT_VISIBILITY_TIMEOUT_MS
    source: str = "<mapping>"

    def tool(self, name: str) -> ToolConfig:
        """The named tool, or a ConfigError listing the known ones."""
        try:
            return self.tools[name]
        except KeyError:
            known = ", ".join(sorted(self.tools)) or "(none)"
            raise ConfigError(f"unknown tool {name!r}; known tools: {known}") from None


def _split_quotas(data: dict[str, Any], limits: tuple[Limit, ...]) -> dict[str, Any]:
    """Calendar quotas ("N/1d") are not sliding windows: they go to `quotas`."""
    quotas = tuple(limit for limit in limits if limit.calendar)
    if not quotas:
        return data
    return {**data, "limits": tuple(x for x in limits if not x.calendar), "quotas": quotas}


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
