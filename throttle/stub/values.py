"""The smallest JSON value a JSON Schema accepts, for the stub's tool-call arguments.

Covers what tool schemas use: `type` (or a list of types), `const`, `enum`, `default`,
`anyOf` / `oneOf` / `allOf`, local `$ref`s, required properties, string lengths and common
formats, number bounds, array lengths. A `pattern` is met only through `examples`; the
stub checks every value it makes and says so when it cannot make one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_FORMATS = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "a@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "ipv4": "127.0.0.1",
}
_TYPE_ORDER = ("object", "string", "integer", "number", "boolean", "array", "null")
MAX_DEPTH = 32


def minimal_value(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small value valid against `schema` (best effort where noted in the module doc)."""
    root = schema if root is None else root
    if depth > MAX_DEPTH:
        raise ValueError("the schema nests too deeply (or refers to itself) to make a value")
    if schema is True or not isinstance(schema, Mapping):
        return {}
    if "$ref" in schema:
        return minimal_value(_resolve(schema["$ref"], root), root, depth + 1)
    for keyword in ("const", "default"):
        if keyword in schema:
            return schema[keyword]
    if schema.get("enum"):
        return schema["enum"][0]
    if schema.get("examples"):
        return schema["examples"][0]
    for keyword in ("anyOf", "oneOf"):
        if schema.get(keyword):
            return minimal_value(schema[keyword][0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged = _merge(merged, _resolve(part["$ref"], root) if "$ref" in part else part)
        return minimal_value(merged, root, depth + 1)
    return _of_type(schema, _type_of(schema), root, depth)


def _type_of(schema: Mapping[str, Any]) -> str:
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared
    if isinstance(declared, list) and declared:
        return str(min(declared, key=lambda name: _TYPE_ORDER.index(name)
                       if name in _TYPE_ORDER else len(_TYPE_ORDER)))
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "minItems" in schema:
        return "array"
    if "minLength" in schema or "format" in schema:
        return "string"
    return "object"


def _of_type(schema: Mapping[str, Any], kind: str, root: Any, depth: int) -> Any:
    if kind == "object":
        properties = schema.get("properties", {})
        return {
            name: minimal_value(properties.get(name, {}), root, depth + 1)
            for name in schema.get("required", [])
        }
    if kind == "array":
        count = int(schema.get("minItems", 0))
        prefix = list(schema.get("prefixItems", []))
        items = [minimal_value(item, root, depth + 1) for item in prefix[:count]]
        item_schema = schema.get("items", {})
        items += [minimal_value(item_schema, root, depth + 1)] * (count - len(items))
        if count > 1 and schema.get("uniqueItems"):
            raise ValueError("cannot make distinct array items; give the schema `examples`")
        return items
    if kind == "string":
        text = _FORMATS.get(str(schema.get("format")), "")
        length = int(schema.get("minLength", 0))
        return text if len(text) >= length else text + "x" * (length - len(text))
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    raise ValueError(f"unknown type {kind!r}")


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    low = schema.get("minimum")
    if "exclusiveMinimum" in schema:
        bound = float(schema["exclusiveMinimum"])
        low = math.floor(bound) + 1 if integer else bound + 1e-6
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 0 if low is None else float(low)
    if high is not None and value >= float(high) and low is None:
        value = float(high) - 1 if "exclusiveMaximum" in schema else float(high)
    if integer:
        value = math.ceil(value)
        step = int(schema.get("multipleOf", 1))
        return int(math.ceil(value / step) * step)
    return value


def _resolve(ref: str, root: Any) -> Any:
    if not ref.startswith("#"):
        raise ValueError(f"cannot follow the non-local $ref {ref!r}")
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**base, **extra}
    merged["properties"] = {**base.get("properties", {}), **extra.get("properties", {})}
    merged["required"] = [*base.get("required", []), *extra.get("required", [])]
    return merged
