"""The public surface: a curated, sorted `__all__` whose every name imports."""

from __future__ import annotations

import importlib
import types

import throttle

DOCUMENTED = {
    "Action",
    "AsyncGate",
    "Config",
    "ConfigError",
    "Decision",
    "Gate",
    "StoreUnavailable",
    "Throttled",
    "load_config",
    "outcome",
    "report_headers",
    "wait",
}


def test_all_is_sorted_and_has_no_duplicates() -> None:
    assert throttle.__all__ == sorted(throttle.__all__)
    assert len(set(throttle.__all__)) == len(throttle.__all__)


def test_every_exported_name_is_importable() -> None:
    module = importlib.import_module("throttle")
    for name in throttle.__all__:
        member = getattr(module, name)
        assert getattr(member, "__module__", "").startswith("throttle."), name
        namespace: dict[str, object] = {}
        exec(f"from throttle import {name}", namespace)
        assert namespace[name] is member


def test_every_public_member_is_exported() -> None:
    public = {
        name
        for name, member in vars(throttle).items()
        if not name.startswith("_") and not isinstance(member, types.ModuleType)
    }
    assert public == set(throttle.__all__)


def test_the_documented_names_are_exported() -> None:
    assert set(throttle.__all__) >= DOCUMENTED
