"""The tools file's frozen, validated objects: `ToolConfig`, `PoolConfig`, `Config`
(read from TOML by `throttle/config_file.py`).

Every mistake becomes a `ConfigError` naming the file, the tool and the field, and saying
what is expected. Durations are written with units ("500ms", "30s", "2m", "1h") and held in
milliseconds (`window_ms`, `max_delay_ms`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from throttle import bounds
from throttle.errors import ConfigError
from throttle.functions import check_function_path, load_function
from throttle.limit import Limit, parse_duration_ms

DEFAULT_VISIBILITY_TIMEOUT_MS = 3_600_000
DEFAULT_SLOT_MARGIN_MS = 40


def _duration_ms(value: Any, example: str, most_ms: int, least_ms: int = 1) -> int:
    """A duration written with its unit ("30s"), in ms within its bounds, else a ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} needs a unit; write it as a string such as \"{example}\"")
    return bounds.check_duration(value, parse_duration_ms(value), most_ms, least_ms)


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
        return _duration_ms(value, "30s", bounds.MAX_MAX_DELAY_MS)

    @field_validator("lease_timeout_ms", mode="before")
    @classmethod
    def _parse_lease_timeout(cls, value: Any) -> int:
        return _duration_ms(value, "60s", bounds.MAX_LEASE_TIMEOUT_MS,
                            bounds.MIN_LEASE_TIMEOUT_MS)

    @field_validator("fair_horizon_ms", mode="before")
    @classmethod
    def _parse_fair_horizon(cls, value: Any) -> int:
        return _duration_ms(value, "500ms", bounds.MAX_WINDOW_MS)

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
        if isinstance(value, str) and value.strip() in ("0", "0ms", "0s"):
            return 0
        return _duration_ms(value, "40ms", bounds.MAX_SLOT_MARGIN_MS)

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
