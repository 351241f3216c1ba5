"""TOML text for a parsed tools file, so real workers can load the demo's scaled config.

`tomllib` only reads. This writes the subset `tomllib` produces from a tools file: tables,
strings, integers, floats, booleans and arrays (arrays of tables are written inline).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dumps(document: Mapping[str, Any]) -> str:
    """The TOML text of `document`; `tomllib.loads` of it gives `document` back."""
    lines: list[str] = []
    _table(lines, (), document)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    values = {key: value for key, value in table.items() if not isinstance(value, Mapping)}
    if path and (values or not table):
        lines.append(f"[{'.'.join(_key(part) for part in path)}]")
    lines.extend(f"{_key(key)} = {_value(value)}" for key, value in values.items())
    for key, value in table.items():
        if isinstance(value, Mapping):
            _table(lines, (*path, key), value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are valid in a TOML basic string; TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise ValueError(f"TOML cannot hold {type(value).__name__} values ({value!r})")
