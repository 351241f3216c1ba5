"""`throttle flower` refuses to serve without credentials and never takes them from argv."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from throttle.cli import main
from throttle.monitor.flower import basic_auth_from_env, check_basic_auth

NO_AUTH = {"FLOWER_BASIC_AUTH": "", "THROTTLE_FLOWER_USER": "", "THROTTLE_FLOWER_PASSWORD": ""}


def test_without_credentials_it_refuses_and_says_how_to_set_them() -> None:
    done = CliRunner().invoke(main, ["flower"], env=NO_AUTH)
    assert done.exit_code == 2
    for name in ("FLOWER_BASIC_AUTH", "THROTTLE_FLOWER_USER", "THROTTLE_FLOWER_PASSWORD",
                 "--insecure-no-auth"):
        assert name in done.output


def test_credentials_on_the_command_line_are_refused_unechoed() -> None:
    done = CliRunner().invoke(main, ["flower", "--basic-auth=ops:hunter2"], env=NO_AUTH)
    assert done.exit_code == 2
    assert "environment" in done.output and "hunter2" not in done.output


def test_a_malformed_credential_is_refused_without_echoing_it() -> None:
    done = CliRunner().invoke(main, ["flower"], env={**NO_AUTH, "FLOWER_BASIC_AUTH": "hunter2"})
    assert done.exit_code == 2
    assert "user:password" in done.output and "hunter2" not in done.output


def test_credentials_come_from_flowers_variable_or_throttles_pair() -> None:
    assert basic_auth_from_env({"FLOWER_BASIC_AUTH": "a:b,c:d"}) == "a:b,c:d"
    pair = {"THROTTLE_FLOWER_USER": "ops", "THROTTLE_FLOWER_PASSWORD": "pw"}
    assert basic_auth_from_env(pair) == "ops:pw"
    assert basic_auth_from_env({"THROTTLE_FLOWER_USER": "ops"}) is None
    assert check_basic_auth("a:b,c:d:e") == ["a", "c"]
    with pytest.raises(ValueError, match="user:password"):
        check_basic_auth("a:")
