"""Config loading: every mistake is a ConfigError naming the file, the tool and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from throttle import Config, ConfigError, load_config
from throttle.limit import Limit, parse_duration_ms

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "config" / "tools.toml"

GOOD_TOOL = 'limits = ["5/60s"]\nmax_delay = "30s"\n'


def write(tmp_path: Path, text: str, name: str = "tools.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(source: str | Path | dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(source)
    return str(caught.value)


def tool_with(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"limits": ["5/60s"], "max_delay": "30s"}
    body.update(fields)
    return {"tools": {"search": body}}


# --- what a good config gives -------------------------------------------------------------


def test_a_minimal_config_loads_with_defaults() -> None:
    config = load_config({"tools": {"t": {"limits": ["5/60s"], "max_delay": "10m"}}})
    assert isinstance(config, Config)
    tool = config.tool("t")
    assert tool.limits == (Limit(max=5, window_ms=60_000),)
    assert tool.max_delay_ms == 600_000
    assert (tool.on_store_error, tool.pace, tool.key) == ("fallback", "earliest", None)
    assert tool.queue == "tool.t"
    assert config.visibility_timeout_ms == 3_600_000


def test_the_default_file_loads_its_four_tools() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert set(config.tools) == {
        "search_products",
        "get_inventory",
        "lookup_order",
        "process_refund",
        "chat_completion",
    }
    assert config.source == str(DEFAULT_CONFIG)
    assert config.tool("process_refund").limits == (Limit(max=5, window_ms=60_000),)


def test_a_path_given_as_a_string_loads_too(tmp_path: Path) -> None:
    path = write(tmp_path, f"[tools.a]\n{GOOD_TOOL}")
    assert set(load_config(str(path)).tools) == {"a"}


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("2m", 120_000),
        ("1h", 3_600_000),
        ("1.5s", 1_500),
        ("s", 1_000),
    ],
)
def test_durations_carry_their_unit(text: str, expected_ms: int) -> None:
    assert parse_duration_ms(text) == expected_ms


def test_a_limit_reads_max_per_window_and_prints_back() -> None:
    assert Limit.parse("100/60s") == Limit(max=100, window_ms=60_000)
    assert Limit.parse("10/s") == Limit(max=10, window_ms=1_000)
    assert str(Limit.parse("100/60s")) == "100/1m"
    assert str(Limit.parse("3/250ms")) == "3/250ms"


def test_defaults_apply_to_every_tool_unless_it_sets_its_own(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[defaults]\nmax_delay = "20s"\npace = "even"\n\n'
        '[tools.a]\nlimits = ["1/1s"]\n\n[tools.b]\nlimits = ["1/1s"]\nmax_delay = "5s"\n',
    )
    config = load_config(path)
    assert (config.tool("a").max_delay_ms, config.tool("a").pace) == (20_000, "even")
    assert (config.tool("b").max_delay_ms, config.tool("b").pace) == (5_000, "even")


def test_an_unknown_tool_is_named_with_the_known_ones() -> None:
    config = load_config({"tools": {"a": {"limits": ["1/1s"], "max_delay": "1s"}}})
    with pytest.raises(ConfigError, match=r"unknown tool 'b'; known tools: a"):
        config.tool("b")


# --- each mistake gives its message -------------------------------------------------------


def test_an_unknown_unit_names_the_unit_and_the_expected_ones(tmp_path: Path) -> None:
    path = write(tmp_path, '[tools.search]\nlimits = ["100/60x"]\nmax_delay = "30s"\n')
    message = error_of(path)
    assert str(path) in message
    assert "'search'" in message
    assert "'limits'" in message
    assert "unknown unit 'x'" in message
    assert "ms, s, m, h" in message


@pytest.mark.parametrize("limit", ["0/60s", "-1/60s", "-5/1m"])
def test_a_zero_or_negative_max_is_refused(tmp_path: Path, limit: str) -> None:
    path = write(tmp_path, f'[tools.search]\nlimits = ["{limit}"]\nmax_delay = "30s"\n')
    message = error_of(path)
    assert str(path) in message
    assert "'search'" in message and "'limits'" in message
    assert "positive whole number" in message


@pytest.mark.parametrize("limit", ["5/0s", "5/-60s", "5/0ms"])
def test_a_zero_or_negative_window_is_refused(limit: str) -> None:
    message = error_of(tool_with(limits=[limit]))
    assert "'search'" in message and "'limits'" in message
    assert "greater than zero" in message


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (["100"], "not a limit"),
        (["1.5/60s"], "whole number"),
        (["5/60"], "not a duration"),
        ([], "one or more limits"),
    ],
)
def test_a_malformed_limit_says_what_is_expected(limits: list[str], expected: str) -> None:
    message = error_of(tool_with(limits=limits))
    assert "'search'" in message and "'limits'" in message
    assert expected in message


def test_a_duplicate_tool_is_refused_with_the_file_named(tmp_path: Path) -> None:
    path = write(tmp_path, f"[tools.a]\n{GOOD_TOOL}\n[tools.a]\n{GOOD_TOOL}")
    message = error_of(path)
    assert str(path) in message
    assert "duplicate" in message
    assert "'a'" in message


def test_a_duplicate_tool_in_a_list_of_tools_is_refused() -> None:
    tool = {"name": "a", "limits": ["1/1s"], "max_delay": "1s"}
    assert "duplicate tool 'a'" in error_of({"tools": [tool, dict(tool)]})


def test_an_unknown_field_names_the_field_the_tool_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'[tools.search]\n{GOOD_TOOL}colour = "blue"\n')
    message = error_of(path)
    assert str(path) in message
    assert "unknown field" in message
    assert "'colour'" in message
    assert "'search'" in message
    assert "max_delay" in message, "the known fields are listed"


def test_a_fallback_that_breaks_the_result_schema_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"[tools.search]\n{GOOD_TOOL}"
        '[tools.search.result]\ntype = "object"\nrequired = ["results"]\n'
        "[tools.search.fallback]\ntotal = 0\n",
    )
    message = error_of(path)
    assert str(path) in message
    assert "'search'" in message
    assert "'fallback'" in message
    assert "'results' is a required property" in message


def test_a_fallback_that_matches_the_result_schema_loads() -> None:
    result = {"type": "object", "required": ["results"]}
    config = load_config(tool_with(result=result, fallback={"results": []}))
    assert config.tool("search").fallback == {"results": []}


@pytest.mark.parametrize(("max_delay", "visibility"), [("1h", "1h"), ("2h", "1h"), ("11m", "10m")])
def test_max_delay_at_or_above_the_visibility_timeout_is_refused(
    tmp_path: Path, max_delay: str, visibility: str
) -> None:
    path = write(
        tmp_path,
        f'[broker]\nvisibility_timeout = "{visibility}"\n\n'
        f'[tools.search]\nlimits = ["5/60s"]\nmax_delay = "{max_delay}"\n',
    )
    message = error_of(path)
    assert str(path) in message
    assert "'search'" in message and "'max_delay'" in message
    assert "visibility_timeout" in message


def test_max_delay_just_below_the_visibility_timeout_loads() -> None:
    config = load_config({"broker": {"visibility_timeout": "2h"}, **tool_with(max_delay="119m")})
    assert config.tool("search").max_delay_ms == 119 * 60_000
    assert config.visibility_timeout_ms == 7_200_000


def test_a_visibility_timeout_without_a_unit_is_refused() -> None:
    message = error_of({"broker": {"visibility_timeout": 600}, **tool_with()})
    assert "[broker]" in message and "'visibility_timeout'" in message
    assert "not a duration" in message


def test_an_unknown_broker_field_is_refused() -> None:
    message = error_of({"broker": {"visibility": "1h"}, **tool_with()})
    assert "[broker]" in message and "visibility" in message


def test_a_missing_max_delay_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[tools.search]\nlimits = ["5/60s"]\n')
    message = error_of(path)
    assert str(path) in message
    assert "'search'" in message and "'max_delay'" in message
    assert "required" in message


def test_a_missing_limit_is_refused() -> None:
    message = error_of({"tools": {"search": {"max_delay": "30s"}}})
    assert "'search'" in message and "'limits'" in message and "required" in message


@pytest.mark.parametrize(
    "name", ["Search", "search-products", "1search", "_search", "a" * 65, "sé"]
)
def test_an_invalid_tool_name_is_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[tools."{name}"]\n{GOOD_TOOL}')
    message = error_of(path)
    assert str(path) in message
    assert repr(name) in message
    assert "lowercase letters, digits and '_'" in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("pace", "fast", "'earliest' or 'even'"),
        ("on_store_error", "retry", "'fallback', 'delay' or 'admit'"),
        ("max_delay", "soon", "unknown unit"),
        ("max_delay", "0s", "greater than zero"),
        ("params", {"type": "objekt"}, "not a valid JSON Schema"),
        ("max_args_bytes", 0, "greater than 0"),
        ("max_redeliveries", -1, "greater than or equal to 0"),
    ],
)
def test_a_bad_field_value_names_the_tool_and_the_field(
    field: str, value: Any, expected: str
) -> None:
    message = error_of(tool_with(**{field: value}))
    assert f"tool 'search', field '{field}'" in message
    assert expected in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[tools.a\n")
    message = error_of(path)
    assert str(path) in message and "not valid TOML" in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    message = error_of(path)
    assert str(path) in message and "file not found" in message


def test_an_unknown_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f"[tool.a]\n{GOOD_TOOL}")
    message = error_of(path)
    assert str(path) in message and "unknown section" in message and "'tool'" in message


def test_a_file_without_tools_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[broker]\nvisibility_timeout = "1h"\n')
    message = error_of(path)
    assert str(path) in message and "no tools declared" in message


def test_a_mapping_is_named_as_such_in_messages() -> None:
    assert error_of(tool_with(colour=1)).startswith("<mapping>: tool 'search', field 'colour'")


# --- mistakes that once escaped as something other than a ConfigError --------------------


@pytest.mark.parametrize("value", [-5, 0, 30, True])
def test_a_max_delay_without_a_unit_is_refused(value: Any) -> None:
    """`max_delay = 30` would silently mean 30 ms (and -5 a negative deadline)."""
    message = error_of(tool_with(max_delay=value))
    assert "tool 'search', field 'max_delay'" in message


@pytest.mark.parametrize("text", ["0.4ms", "0.0001s"])
def test_a_duration_below_one_millisecond_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(text)


@pytest.mark.parametrize(
    "raw",
    [
        {"tools": {"search": "oops"}},
        {"broker": "oops", **tool_with()},
        {"defaults": 5, **tool_with()},
    ],
    ids=["tool", "broker", "defaults"],
)
def test_a_section_that_is_not_a_table_is_a_config_error(raw: dict[str, Any]) -> None:
    error_of(raw)


def test_a_tool_name_ending_in_a_newline_is_refused() -> None:
    """`[tools."search\\n"]` would declare the queue 'tool.search\\n'."""
    message = error_of({"tools": {"search\n": {"limits": ["1/1s"], "max_delay": "1s"}}})
    assert "lowercase letters" in message


def test_a_directory_instead_of_a_file_is_a_config_error(tmp_path: Path) -> None:
    assert str(tmp_path) in error_of(tmp_path)
