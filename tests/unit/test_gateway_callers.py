"""Callers bound to tenants: the keys' map, the limits' keys it yields, and a refused start."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from throttle import Config, load_config
from throttle.errors import ConfigError
from throttle.gateway.callers import callers_from_env, parse_keys
from throttle.gateway.chat import read_call
from throttle.gateway.errors import ApiError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> Config:
    """The default tools file with chat_completion limited per session."""
    document = tomllib.loads((ROOT / "config" / "tools.toml").read_text(encoding="utf-8"))
    chat = document["tools"]["chat_completion"]
    chat["key"] = "session_id"
    chat["params"]["required"] = [*chat["params"]["required"], "session_id"]
    return load_config(document)


def body(**fields: Any) -> dict[str, Any]:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    return {"messages": [{"role": "user", "content": "hi"}], "tools": tools, **fields}


def test_each_key_proves_its_tenant_and_plain_keys_are_tenants_of_their_own() -> None:
    callers = parse_keys("acme:k-a1, acme:k-a2,\nglobex:k-g\n# a comment: not a key\nplain-k")
    assert callers.tenant_of("k-a1") == callers.tenant_of("k-a2") == "acme"
    assert callers.tenant_of("k-g") == "globex"
    assert callers.tenant_of("acme") is None and callers.tenant_of("acme:k-a1") is None
    plain = callers.tenant_of("plain-k")
    assert plain is not None and plain.startswith("key-") and "plain-k" not in plain
    assert callers.tenants == tuple(sorted(("acme", "globex", plain)))
    assert "k-a1" not in repr(callers) and not parse_keys(" , ").tenants
    assert parse_keys("").open and not callers.open


@pytest.mark.parametrize(("text", "match"), [
    ("acme:k-1,globex:k-1", "one key is listed for tenants 'acme' and 'globex'"),
    ("acme:", "tenant 'acme' has an empty key"),
    ("a cme/x:secret-part", "not a tenant name"),
])
def test_a_key_map_that_would_blur_who_calls_is_refused_without_showing_a_key(
    text: str, match: str,
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_keys(text)
    assert "secret-part" not in str(info.value) and "k-1" not in str(info.value)


def test_the_keys_come_from_the_variable_or_a_file_never_both(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# tenant:key\nacme:k-file\n", encoding="utf-8")
    callers = callers_from_env({"THROTTLE_GATEWAY_KEYS_FILE": str(path)})
    assert callers.tenant_of("k-file") == "acme"
    with pytest.raises(ConfigError, match="set one"):
        callers_from_env({"THROTTLE_GATEWAY_KEYS_FILE": str(path),
                          "THROTTLE_GATEWAY_KEYS": "acme:k"})
    path.write_bytes(b"acme:\xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8 file"):
        callers_from_env({"THROTTLE_GATEWAY_KEYS_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot read"):
        callers_from_env({"THROTTLE_GATEWAY_KEYS_FILE": str(tmp_path / "absent")})


def test_the_limit_key_is_the_key_s_tenant_narrowed_by_user_never_the_user_alone(
    config: Config,
) -> None:
    alice_of = {tenant: read_call(body(user="alice"), config, "chat_completion", tenant).kwargs
                for tenant in ("acme", "globex")}
    assert alice_of["acme"]["session_id"] == "acme/alice"
    assert alice_of["globex"]["session_id"] == "globex/alice"  # no collision across tenants
    assert alice_of["acme"]["tenant"] == "acme"
    # A body claiming another tenant or session changes nothing: those fields are not read.
    spoofed = read_call(body(user="alice", session_id="globex/alice", tenant="globex"),
                        config, "chat_completion", "acme").kwargs
    assert (spoofed["session_id"], spoofed["tenant"]) == ("acme/alice", "acme")
    assert read_call(body(), config, "chat_completion", "acme").kwargs["session_id"] == "acme"
    for user in (7, ["alice"], "u" * 129):
        with pytest.raises(ApiError) as info:
            read_call(body(user=user), config, "chat_completion", "acme")
        assert (info.value.status, info.value.param, info.value.code) == (
            400, "user", "invalid_user")


def test_the_gateway_refuses_to_listen_beyond_loopback_without_caller_keys(
    tmp_path: Path,
) -> None:
    command = [sys.executable, "-m", "throttle.cli", "gateway", "--host", "0.0.0.0",
               "--port", "0", "--redis-url", "redis://127.0.0.1:1/0"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "THROTTLE_GATEWAY_KEYS": " "}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "no caller key is set" in done.stderr and "THROTTLE_GATEWAY_KEYS=" in done.stderr
    assert "--host 127.0.0.1" in done.stderr
