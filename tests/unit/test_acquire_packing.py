"""A fixed tool's acquire FCALL, packed from runs packed once, is byte for byte hiredis's."""

from __future__ import annotations

import hiredis
import pytest

from throttle import Gate, load_config

CONFIG = load_config({
    "pools": {"p": {"limits": ["100/1s", "1000/1d"], "shares": {"critical": 1.0, "standard": 0.5}}},
    "tools": {
        "plain": {"limits": ["10/1s"], "max_delay": "1m"},
        "two": {"limits": ["10/1s", "100/1m"], "max_delay": "1m", "pace": "even"},
        "quota": {"limits": ["10/1s", "500/1d"], "max_delay": "1m"},
        "pooled": {"limits": ["10/1s"], "max_delay": "1m", "pool": "p",
                   "priority": "standard", "concurrency": 3},
        "keyed": {"limits": ["10/1s"], "max_delay": "1m", "key": "user"},
    },
})


@pytest.mark.parametrize("tool", ["plain", "two", "quota", "pooled"])
@pytest.mark.parametrize("receipt", [None, "tag|nonce"])
@pytest.mark.parametrize(("cost", "deadline_s", "now_s"), [
    (1, None, None), (2.5, 3.0, 1_700_000_000.25), (1e-05, -1.0, None)])
def test_a_fixed_tool_s_packed_fcall_is_hiredis_s(
    tool: str, receipt: str | None, cost: float, deadline_s: float | None,
    now_s: float | None,
) -> None:
    gate = Gate("redis://127.0.0.1:1/0", CONFIG, prefix="packing")  # (never connects)
    for member in ("first", "a-second-call-with-a-longer-id-0123456789"):
        keys, args = gate._acquire_call(tool, member, None, cost, deadline_s, now_s, receipt)
        packed = gate._packed_fcall(tool, args, receipt)
        assert packed == hiredis.pack_command(gate._acquire_script.fcall(keys, args))


def test_a_keyed_tool_is_packed_by_hiredis() -> None:
    gate = Gate("redis://127.0.0.1:1/0", CONFIG, prefix="packing")
    _, args = gate._acquire_call("keyed", "m", "u1", 1, None, None)
    assert gate._packed_fcall("keyed", args, None) is None
