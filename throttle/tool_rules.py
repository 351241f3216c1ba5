"""Rules a tool must keep beyond each field's own, so that throttle can keep its promises.

  fallback      a tool with a `result` schema has a fallback that validates against it
                (without one the fallback would be null, which the schema refuses)
  key           the argument limits are keyed on is always there and never null: required
                by `params` and refusing null (else a call without it would not be limited
                per key); checked where `params` declares properties, otherwise at call time
                (the gate refuses a keyed call without its key)
  fair_by       the argument calls are shared by is always there and never null (as `key`)
  slot_margin   shorter than the shortest window (else every slot lands past the next one)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jsonschema


class _Window(Protocol):
    @property
    def window_ms(self) -> int: ...


class RuledTool(Protocol):
    """The fields of a tool (`throttle.config.ToolConfig`) these rules read."""

    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def result(self) -> Mapping[str, Any]: ...
    @property
    def fallback(self) -> Any: ...
    @property
    def key(self) -> str | None: ...
    @property
    def fair_by(self) -> str | None: ...
    @property
    def limits(self) -> Sequence[_Window]: ...
    @property
    def slot_margin_ms(self) -> float: ...


def tool_problems(tool: RuledTool) -> list[tuple[str, str]]:
    """(field, what is wrong and how to fix it) for each rule `tool` breaks."""
    problems = []
    fallback = _fallback_problem(tool.result, tool.fallback)
    if fallback:
        problems.append(("fallback", fallback))
    key = argument_problem(tool.params, tool.key, "per-key limits") if tool.key else None
    if key:
        problems.append(("key", key))
    fair = argument_problem(tool.params, tool.fair_by, "fair share") if tool.fair_by else None
    if fair:
        problems.append(("fair_by", fair))
    shortest_ms = min(limit.window_ms for limit in tool.limits)
    if tool.slot_margin_ms >= shortest_ms:
        problems.append(("slot_margin", f"{tool.slot_margin_ms} ms is not shorter than the "
                         f"shortest window ({shortest_ms} ms), so every slot would land past "
                         "the next one; use a few percent of the window"))
    return problems


def _fallback_problem(result: Mapping[str, Any], fallback: Any) -> str | None:
    if not result:
        return None
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(result).iter_errors(fallback))
    if error is None:
        return None
    if fallback is None:
        return ("missing: the tool has a result schema, and without a fallback a call that "
                "cannot run would return null, which the schema refuses; add a "
                "[tools.<name>.fallback] table that validates against `result`")
    return f"does not validate against the tool's result schema: {error.message}"


def argument_problem(params: Mapping[str, Any], key: str, what: str) -> str | None:
    """What is wrong with naming argument `key` for `what` ("per-key limits" or "fair share")
    (None when it is always there and never null, or `params` declares no properties)."""
    properties = params.get("properties")
    if not isinstance(properties, Mapping):
        return None  # no declared parameters: the gate refuses a call without its key
    if key not in properties:
        return (f"{key!r} is not a parameter of the tool (its params declare "
                f"{sorted(properties)}); name one of them, or add {key!r} to params")
    if key not in params.get("required", []):
        escapes = f"the per-{key} limits" if what == "per-key limits" else f"the {what} by {key}"
        return (f"{key!r} is optional, so a call without it would escape {escapes}; "
                f"add {key!r} to params.required")
    try:
        accepts_null = jsonschema.Draft202012Validator(properties[key]).is_valid(None)
    except jsonschema.exceptions.SchemaError:
        return None  # the schema's own check reports it
    except Exception:  # a $ref to the root, say: the schema alone cannot tell
        return None
    if accepts_null:
        unlimited = (f"a null key would not be limited per {key}" if what == "per-key limits"
                     else f"a null value would escape the {what} by {key}")
        return (f"{key!r} may be null, and {unlimited}; make its schema refuse null "
                f"(e.g. type = \"string\")")
    return None
