"""Tools that would break throttle's own promises are ConfigErrors naming file, tool and field.

A result schema without a fallback, a key argument that may be missing or null, numbers
past their documented bounds (throttle/bounds.py), names that break a Redis hash tag, a
file that is not UTF-8; and `throttle check` validating `module:function` paths without
running the module's import-time code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from throttle import load_config
from throttle.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TOOL = """
[tools.t]
limits = ["10/1m"]
max_delay = "30s"
"""
KEYED = {"type": "object", "required": ["tenant"],
         "properties": {"tenant": {"type": "string"}, "q": {"type": "string"}}}


def write(tmp_path: Path, text: str, name: str = "tools.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(source: Path | dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


def tool(**fields: Any) -> dict[str, Any]:
    return {"tools": {"t": {"limits": ["10/1m"], "max_delay": "30s", **fields}}}


def test_a_result_schema_without_a_fallback_is_refused_unless_it_accepts_null(
    tmp_path: Path,
) -> None:
    message = refused(write(tmp_path, TOOL + 'result = { type = "object" }\n'))
    assert f"{tmp_path / 'tools.toml'}: tool 't', field 'fallback': missing" in message
    assert "add a [tools.<name>.fallback] table" in message
    assert load_config(tool(result={"type": ["object", "null"]})).tool("t").fallback is None
    assert load_config(tool(result={"type": "object"}, fallback={})).tool("t").fallback == {}


@pytest.mark.parametrize(("params", "expected"), [
    ({"type": "object", "properties": {"tenant": {"type": "string"}}},
     "'tenant' is optional, so a call without it would escape the per-tenant limits; "
     "add 'tenant' to params.required"),
    ({**KEYED, "properties": {"tenant": {"type": ["string", "null"]}}}, "may be null"),
    ({**KEYED, "properties": {"tenant": {"anyOf": [{"type": "null"}, {"type": "string"}]}}},
     "may be null"),
    ({**KEYED, "properties": {"tenant": {}}}, "may be null"),
    ({"type": "object", "properties": {"q": {"type": "string"}}},
     "'tenant' is not a parameter of the tool"),
])
def test_a_key_that_may_be_missing_or_null_is_refused(
    params: dict[str, Any], expected: str,
) -> None:
    message = refused(tool(key="tenant", params=params))
    assert message.startswith("<mapping>: tool 't', field 'key': "), message
    assert expected in message


def test_a_required_non_null_key_loads_and_undeclared_params_leave_it_to_the_gate() -> None:
    assert load_config(tool(key="tenant", params=KEYED)).tool("t").key == "tenant"
    assert load_config(tool(key="tenant")).tool("t").key == "tenant"  # no params declared


@pytest.mark.parametrize(("line", "field", "expected"), [
    ('limits = ["1/99999999999999999h"]', "limits", "longer than the most allowed"),
    ('limits = ["1/745h"]', "limits", "longer than the most allowed, 744h"),
    ('limits = ["1000000001/1s"]', "limits", "max must be at most 1_000_000_000"),
    ("cost = inf", "cost", "positive, finite number of units"),
    ("cost = nan", "cost", "positive, finite number of units"),
    ("cost = 1e12", "cost", "up to 1_000_000_000"),
    ('slot_margin = "9999999h"', "slot_margin", "longer than the most allowed"),
    ('slot_margin = "11s"', "slot_margin", "longer than the most allowed, 10s"),
    ('max_delay = "25h"', "max_delay", "longer than the most allowed, 24h"),
    ('lease_timeout = "500ms"', "lease_timeout", "shorter than the least allowed"),
    ('lease_timeout = "25h"', "lease_timeout", "longer than the most allowed, 24h"),
])
def test_numbers_past_their_documented_bounds_are_refused(
    tmp_path: Path, line: str, field: str, expected: str,
) -> None:
    text = TOOL.replace('limits = ["10/1m"]\n', "") if field == "limits" else TOOL
    text = text.replace('max_delay = "30s"\n', "") if field == "max_delay" else text
    text = '[broker]\nvisibility_timeout = "48h"\n' + text + line + "\n"
    message = refused(write(tmp_path, text))
    assert f"tools.toml: tool 't', field '{field}': " in message, message
    assert expected in message, message


def test_a_slot_margin_as_long_as_the_shortest_window_is_refused() -> None:
    message = refused(tool(limits=["10/1m", "2/2s"], slot_margin="2s"))
    assert "field 'slot_margin': 2000 ms is not shorter than the shortest window" in message
    assert load_config(tool(limits=["2/2s"], slot_margin="1999ms")).tool("t").slot_margin_ms


@pytest.mark.parametrize(("pools", "expected"), [
    ({"a}b{c": {"limits": ["10/1m"], "shares": {"hi": 1.0}}}, "pool 'a}b{c' is not a valid"),
    ({"p": {"limits": ["10/1m"], "shares": {"h{i}": 1.0}}}, "priority class 'h{i}'"),
])
def test_pool_and_class_names_that_would_break_a_hash_tag_are_refused(
    pools: dict[str, Any], expected: str,
) -> None:
    assert expected in refused({**tool(), "pools": pools})


def test_a_config_file_that_is_not_utf8_is_a_config_error_and_check_prints_no_traceback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tools.toml"
    path.write_bytes(TOOL.encode() + b'description = "caf\xe9"\n')  # Latin-1
    message = refused(path)
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset")
    assert "save the file as UTF-8" in message
    done = check_command(tmp_path, str(path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "not UTF-8" in done.stderr


def check_command(pythonpath: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "throttle.cli", "check", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200",
                                    "PYTHONPATH": f"{pythonpath}:{ROOT}"})


def test_check_validates_cost_paths_without_running_the_modules_import_time_code(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "imported"
    package = tmp_path / "sidefx"
    package.mkdir()
    effect = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (package / "__init__.py").write_text(effect, encoding="utf-8")
    (package / "costs.py").write_text(
        effect + "def tokens(arguments):\n    return 1\n\nsettle = tokens\n", encoding="utf-8")
    config = write(tmp_path, f'{TOOL}cost = "sidefx.costs:tokens"\n'
                   'settle = "sidefx.costs:settle"\n')

    done = check_command(tmp_path, str(config))
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "throttle check ran the module's import-time code"

    for path, expected in (("sidefx.costs:nope", "defines no 'nope' at its top level"),
                           ("sidefx.absent:f", "cannot find module 'sidefx.absent'"),
                           ("sidefx.costs.x:f", "is a module, not a package"),
                           ("sidefx.costs", "is not 'module:function'")):
        bad = write(tmp_path, TOOL + f'cost = "{path}"\n', "bad.toml")
        done = check_command(tmp_path, str(bad))
        assert done.returncode == 1 and expected in done.stderr, (path, done.stderr)
        assert "field 'cost'" in done.stderr and not marker.exists()

    done = check_command(tmp_path, "--import", str(config))
    assert done.returncode == 0, done.stderr
    assert marker.read_text(encoding="utf-8").split() == ["sidefx", "sidefx.costs"]


def test_the_project_config_passes_every_rule_with_and_without_importing() -> None:
    for import_functions in (True, False):
        config = load_config(ROOT / "config" / "tools.toml", import_functions=import_functions)
        assert config.tool("chat_completion").cost == "workers.tools.llm:estimate_tokens"
