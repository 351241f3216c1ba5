"""A tool's JSON Schema, checked fast where that cannot change the verdict.

`jsonschema` (Draft 2020-12) decides and words every refusal. Where `jsonschema-rs` is
installed (the `gateway` extra), it answers first for parsed JSON (dicts, lists, strings,
numbers, booleans, null; no tuples, which jsonschema does not count as arrays): a value it
finds valid is valid, about a hundred times faster; anything else goes to `jsonschema`, so
the errors are the same. It is used only for schemas made of the keywords below, with
`pattern` and `multipleOf` judged by jsonschema's own rules (Python's `re.search`, its float
division), formats not asserted and no `$ref` leaving the schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

try:
    import jsonschema_rs
except ImportError:  # not installed: jsonschema alone
    jsonschema_rs = None  # type: ignore[assignment]

# Keywords whose value is a subschema, a list of them, or a map of names to them.
ONE_SCHEMA = frozenset({"not", "if", "then", "else", "items", "contains",
                        "additionalProperties", "propertyNames"})
SCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
SCHEMA_MAP = frozenset({"properties", "$defs", "definitions", "dependentSchemas"})
# Keywords both libraries read alike (checked against each other in the tests).
PLAIN = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
    "required", "dependentRequired", "format", "title", "description", "default",
    "deprecated", "readOnly", "writeOnly", "examples", "$comment", "$ref",
})


class SchemaCheck:
    """One schema's validators, built once (building costs far more than a check)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.validator = jsonschema.Draft202012Validator(schema)
        self.fast = _fast_validator(schema)

    def first_error(self, instance: Any, *, parsed: bool = False) -> ValidationError | None:
        """jsonschema's best error for `instance`, or None when it fits; `parsed` says that
        it was decoded from JSON, which lets the fast validator vouch for it."""
        if parsed and self.fast is not None:
            try:
                if self.fast.is_valid(instance):
                    return None
            except (ValueError, TypeError):  # e.g. a lone surrogate: jsonschema judges
                pass
        if self.validator.is_valid(instance):  # (cheaper than looking for the best error)
            return None
        error: ValidationError | None = best_match(self.validator.iter_errors(instance))
        return error


def _fast_validator(schema: Mapping[str, Any]) -> Any:
    """jsonschema-rs' validator for `schema`, or None (not installed, or a keyword outside
    the list above)."""
    if jsonschema_rs is None or not _plain(schema):
        return None
    try:
        return jsonschema_rs.Draft202012Validator(
            dict(schema), validate_formats=False, offline=True,
            keywords={"pattern": _Pattern, "multipleOf": _MultipleOf})
    except Exception:  # a schema it cannot build (jsonschema has checked it): jsonschema alone
        return None


def _plain(schema: Any) -> bool:
    """Whether `schema` uses only the keywords above, its `$ref`s pointing inside it."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, Mapping):
        return False
    for keyword, value in schema.items():
        if keyword in ONE_SCHEMA:
            if not _plain(value):
                return False
        elif keyword in SCHEMA_LIST:
            if not (isinstance(value, list) and all(_plain(item) for item in value)):
                return False
        elif keyword in SCHEMA_MAP:
            if not (isinstance(value, Mapping) and all(_plain(item) for item in value.values())):
                return False
        elif keyword not in PLAIN or (keyword == "$ref" and not str(value).startswith("#")):
            return False
    return True


class _Pattern:
    """`pattern` as jsonschema reads it: Python's `re.search`, not ECMA-262 regexes."""

    def __init__(self, parent: Any, value: str, path: Any) -> None:
        self.regex = re.compile(value)

    def validate(self, instance: Any) -> None:
        if isinstance(instance, str) and not self.regex.search(instance):
            raise ValueError("does not match")


class _MultipleOf:
    """`multipleOf` as jsonschema reads it (it refuses 0.07 for 0.01: float division)."""

    def __init__(self, parent: Any, value: Any, path: Any) -> None:
        self.check = jsonschema.Draft202012Validator({"multipleOf": value})

    def validate(self, instance: Any) -> None:
        if not self.check.is_valid(instance):
            raise ValueError("not a multiple")
