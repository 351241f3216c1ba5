"""`throttle limits set / show / reset` against the real Redis: what they print, and the
errors a careless caller gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from tests.support.monitoring import ledger_tool
from tests.support.servers import write_config
from throttle.cli import main
from throttle.config_file import load_config
from throttle.fairness import Fairness, live_weights_key

pytestmark = [pytest.mark.redis]



def keyed(name: str) -> dict[str, object]:
    return {"type": "object", "properties": {name: {"type": "string"}}, "required": [name]}


CONFIG = {
    "pools": {"llm": {"limits": ["100/60s"], "shares": {"high": 1.0}}},
    "tools": {
        "search": ledger_tool(["10/1s"], "10s"),
        "chat": {**ledger_tool(["5/1s"], "10s", key="tenant", pool="llm", priority="high"),
                 "params": keyed("tenant")},
        "per_user": {**ledger_tool(["5/1s"], "10s", key="user"), "params": keyed("user")},
    },
}


def limits(tmp_path: Path, redis_url: str, prefix: str, *args: str) -> Result:
    path = write_config(CONFIG, tmp_path / "tools.toml")
    return CliRunner().invoke(main, ["limits", *args, "--redis-url", redis_url, "--prefix",
                                     prefix, "--config", str(path)])


def test_set_show_and_reset_a_tool_a_tier_and_a_pool(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    run = lambda *args: limits(tmp_path, redis_url, prefix, *args)  # noqa: E731
    assert "no live overrides" in run("show").output
    assert run("set", "search", "20/1s", "--by", "ops").output.startswith(
        "search: 20/1s (version 1, set by ops)")
    assert "chat --key acme: 50/1s" in run("set", "chat", "--key", "acme", "50/1s").output
    assert "pool llm: 40/1m" in run("set", "--pool", "llm", "40/60s").output
    assert "per_user --key bob: 9/1s" in run("set", "per_user", "--key", "bob", "9/1s").output
    shown = run("show").output
    for line in ("search", "chat --key acme", "pool llm", "per_user --key bob"):
        assert line in shown
    assert "ops" in shown and "10/1s" in shown  # who, and the file's limits beside
    assert "back to the tools file's limits" in run("reset", "search").output
    assert "had no override" in run("reset", "search").output
    assert "search " not in run("show").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "nope", "1/1s"), "unknown tool 'nope'; known tools: chat, per_user, search"),
        (("set", "search", "ten/1s"), "max 'ten' must be a whole number"),
        (("set", "search"), "give at least one limit"),
        (("set", "search", "--key", "x", "5/1s"), "has no key argument"),
        (("set", "--pool", "nope", "5/1s"), "unknown pool 'nope'"),
        (("reset",), "name a tool"),
    ],
)
def test_a_mistake_is_refused_with_what_to_fix(
    tmp_path: Path, redis_url: str, prefix: str, args: tuple[str, ...], message: str
) -> None:
    done = limits(tmp_path, redis_url, prefix, *args)
    assert done.exit_code != 0
    assert message in done.output


def test_an_unreachable_redis_is_named_with_its_password_masked(
    tmp_path: Path, prefix: str
) -> None:
    done = limits(tmp_path, "redis://:hunter2@127.0.0.1:1/0", prefix, "set", "search", "1/1s")
    assert done.exit_code != 0
    assert "cannot write to the gate's Redis" in done.output and "hunter2" not in done.output


def test_set_a_per_key_default_and_daily_quotas_and_show_them_beside_the_files(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    run = lambda *args: limits(tmp_path, redis_url, prefix, *args)  # noqa: E731
    assert "per_user: 8/1s 100/1d" in run("set", "per_user", "8/1s", "100/1d").output
    assert "search: 5000/1d" in run("set", "search", "5000/1d").output
    assert "pool llm: 90000/1d" in run("set", "--pool", "llm", "90000/1d").output
    shown = run("show").output
    for line in ("per_user ", "8/1s 100/1d", "5000/1d", "90000/1d"):
        assert line in shown
    assert "back to the tools file's limits" in run("reset", "per_user").output
    assert "per_user " not in run("show").output


FAIR = {"tools": {"shared": {**ledger_tool(["10/1s"], "10s"), "params": keyed("tenant"),
                             "fair_by": "tenant", "fair_weights": {"big": 2}},
                  "search": ledger_tool(["10/1s"], "10s")}}


def test_a_tenants_weight_is_set_live_and_reset_to_the_files(
    tmp_path: Path, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    path = write_config(FAIR, tmp_path / "tools.toml")

    def weight(*args: str) -> Result:
        return CliRunner().invoke(main, ["limits", "weight", *args, "--redis-url", redis_url,
                                         "--prefix", prefix, "--config", str(path)])

    config = load_config(path)
    weights = live_weights_key(config, "shared", prefix=prefix)
    done = weight("shared", "acme", "3")
    assert done.exit_code == 0, done.output
    assert "shared: tenant 'acme' weighs 3 from its next call on" in done.output
    assert redis_client.hgetall(weights) == {Fairness.tenant_id("acme").encode(): b"3.0"}
    assert "back to the tools file's weight" in weight("shared", "acme", "--reset").output
    assert redis_client.exists(weights) == 0
    assert "had no weight set live" in weight("shared", "acme", "--reset").output
    for args, message in ((("search", "acme", "2"), "is not shared fairly"),
                          (("shared", "acme", "2", "--reset"), "or --reset, not both"),
                          (("shared", "acme"), "give a WEIGHT"),
                          (("shared", "acme", "0"), "0<x<=1000000000")):
        done = weight(*args)
        assert done.exit_code != 0 and message in done.output, (args, done.output)
