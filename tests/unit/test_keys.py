"""Redis keys: one layout, one hash tag per decision, user values hashed and bounded."""

from __future__ import annotations

import re
from typing import Any

import pytest

from throttle import ConfigError
from throttle.keys import DEFAULT_PREFIX, check_prefix, hash_key_value, tool_keys

HOSTILE_VALUES: list[Any] = [
    "{",
    "}",
    "{other}",
    ":",
    "*",
    "?[a]",
    "\n",
    "\r\n",
    "",
    " ",
    "x" * 10_000,
    "\udcff",
    "\x00",
    "é🙂",
    b"\xff\xfe",
    0,
    -1,
    1.5,
    True,
    [1, "{"],
    {"b": 1, "a": "}"},
]


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first '{' and the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


def test_a_tools_keys_share_its_hash_tag_under_the_prefix() -> None:
    keys = tool_keys("throttle", "search")
    assert keys.log == "throttle:{search}:log"
    assert keys.adm == "throttle:{search}:adm"
    assert keys.cost == "throttle:{search}:cost"
    assert keys.as_list() == [keys.log, keys.adm, keys.cost, keys.cooldown]
    assert {hash_tag(key) for key in keys.as_list()} == {"search"}


def test_the_default_prefix_is_throttle() -> None:
    assert DEFAULT_PREFIX == "throttle"
    assert check_prefix(DEFAULT_PREFIX) == "throttle"


def test_per_key_limits_get_keys_of_their_own_under_the_tools_name() -> None:
    keys = tool_keys("p", "search", "session-1")
    tag = hash_tag(keys.log)
    assert re.fullmatch(r"search\|[0-9a-f]{24}", tag)
    assert {hash_tag(key) for key in keys.as_list()} == {tag}
    assert tool_keys("p", "search", "session-1") == keys
    assert tool_keys("p", "search", "session-2").log != keys.log
    assert tool_keys("p", "other", "session-1").log != keys.log
    assert tool_keys("p", "search").log != keys.log


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda value: repr(value)[:20])
def test_hostile_key_values_stay_short_under_the_prefix_and_in_the_tools_hash_tag(
    value: Any,
) -> None:
    keys = tool_keys("throttle-test", "search", value)
    for key in keys.as_list():
        assert key.startswith("throttle-test:{search|")
        assert len(key) <= len("throttle-test:{search|}:cooldown") + 24
        assert re.fullmatch(r"throttle-test:\{search\|[0-9a-f]{24}\}:(log|adm|cost|cooldown)", key)
        assert key.isascii() and key.isprintable()
        assert hash_tag(key).startswith("search|")


def test_distinct_values_get_distinct_keys() -> None:
    values = [
        "{",
        "}",
        ":",
        "*",
        "\n",
        "",
        "x" * 10_000,
        "x" * 10_001,
        "\udcff",
        "\udcfe",
        "a",
        "A",
    ]
    assert len({tool_keys("p", "t", value).log for value in values}) == len(values)


def test_a_key_value_hashes_the_same_everywhere() -> None:
    assert hash_key_value("session-1") == hash_key_value("session-1")
    assert hash_key_value({"a": 1, "b": 2}) == hash_key_value({"b": 2, "a": 1})
    assert re.fullmatch(r"[0-9a-f]{24}", hash_key_value("x" * 10_000))
    assert re.fullmatch(r"[0-9a-f]{24}", hash_key_value("\udcff"))


@pytest.mark.parametrize("prefix", ["throttle", "app.prod", "a:b", "a-b_c", "x" * 64])
def test_a_safe_prefix_is_kept(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "{a}", "a b", "a*", "x" * 65, "é", "a\nb"])
def test_an_unsafe_prefix_is_refused_with_the_reason(prefix: str) -> None:
    with pytest.raises(ConfigError, match="key prefix") as caught:
        check_prefix(prefix)
    assert "1-64 letters" in str(caught.value)


def test_a_prefix_ending_in_a_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match="key prefix"):
        check_prefix("throttle\n")
