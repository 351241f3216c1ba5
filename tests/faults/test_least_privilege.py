"""The gate as a Redis ACL user confined to throttle's keys and commands, and over TLS.

The ACL line is the one docs/gate.md gives under "Least privilege" (with this test's prefix
and password): the gate and real `celery worker` processes work with it and are refused
anything else. The TLS tests make a CA and a server certificate with `openssl`, start
redis-server with `--tls-port`, and reach it through `rediss://...?ssl_ca_certs=...`.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.test_celery_flow import burst, tool
from tests.support.servers import (
    RedisServer,
    TlsFiles,
    free_port,
    make_tls_files,
    private_redis,
    tls_supported,
)
from tests.support.workers import cluster, ledger
from throttle import Action, Gate, StoreUnavailable, load_config, outcome
from throttle.overrides import parse_limits, set_override
from throttle.windows import most_in_window

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "throttle", "s3cret-for-tests"
GATE_CONFIG = load_config(
    {
        "pools": {"p": {"limits": ["5/300ms"], "shares": {"high": 1.0, "low": 0.5}}},
        "tools": {
            "plain": {"limits": ["2/300ms"], "max_delay": "2s"},
            "weighted": {"limits": ["4/300ms"], "max_delay": "2s", "key": "tenant"},
            "pooled": {"limits": ["10/300ms"], "max_delay": "2s", "pool": "p", "priority": "low"},
            "capped": {
                "limits": ["10/300ms"], "max_delay": "2s", "concurrency": 1, "lease_timeout": "1s"
            },
        },
    }
)
WORKER_CONFIG = {"tools": {"burst": tool(["50/1s"], "10s")}}
CALLS = 200


def documented_acl(prefix: str) -> list[str]:
    """The `ACL SETUSER` words of docs/gate.md's "Least privilege" section, for `prefix`."""
    text = (ROOT / "docs" / "gate.md").read_text()
    section = text.split("## Least privilege", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith("ACL SETUSER"))
    words = shlex.split(line)
    assert words[2] == USER and "~throttle:*" in words and any(w.startswith(">") for w in words)
    return [
        f"~{prefix}:*" if w == "~throttle:*" else f">{PASSWORD}" if w.startswith(">") else w
        for w in words
    ]


def script_commands() -> set[str]:
    """Every command the gate's Lua scripts call."""
    found: set[str] = set()
    for script in (ROOT / "throttle" / "lua").glob("*.lua"):
        found |= {c.lower() for c in re.findall(r"redis\.p?call\('(\w+)'", script.read_text())}
    return found


def exercise(gate: Gate) -> int:
    """Every gate operation a worker performs: admit, reserve, admit by reservation, weighted
    and pooled calls, settle, release, leases, redelivery counts, cooldowns. Returns how many
    decisions were made."""
    decisions = 0

    def burst_of(tool: str, key: Any = None, cost: float = 1) -> list[str]:
        nonlocal decisions
        members = [f"{tool}-{decisions + n}" for n in range(4)]
        for member in members:
            decision = gate.acquire(tool, member, key=key, cost=cost)
            decisions += 1
            if decision.action is Action.DELAY:
                time.sleep(decision.wait_s)
                gate.acquire(tool, member, key=key, cost=cost)
                decisions += 1
        gate.release(tool, members[-1], key=key)
        return members

    burst_of("plain")
    weighted = burst_of("weighted", key="t-1", cost=2)
    gate.settle("weighted", weighted[0], 1.5, key="t-1")
    gate.settle("weighted", weighted[1], 1, key="t-1")
    pooled = burst_of("pooled", cost=1.5)
    gate.settle("pooled", pooled[0], 1)
    capped = burst_of("capped")
    gate.finish("capped", capped[0])
    gate.note_redelivery("capped", capped[0])
    gate.acquire("capped", capped[0])
    time.sleep(0.4)  # the weighted entries leave the window: trimming deletes their costs
    burst_of("weighted", key="t-1", cost=2)
    gate.cool_down("plain", 0.2, member="plain-0")
    gate.cooldown_left("plain")
    gate.acquire("plain", "after-cooldown")
    return decisions + 1


def outcomes_of(results: list[Any], timeout_s: float = 40.0) -> list[str]:
    """Wait for every call (a failed one raises); "result" or "fallback" for each."""
    deadline = time.monotonic() + timeout_s
    for result in results:
        result.get(timeout=max(0.1, deadline - time.monotonic()))
    return [outcome(result) for result in results]


def acl_denials(admin: redis.Redis) -> list[str]:
    return [
        f"{entry[b'context'].decode()}:{entry[b'object'].decode()}"
        for entry in admin.execute_command("ACL", "LOG")
        if entry[b"username"] == USER.encode()
    ]


@pytest.fixture
def acl_user(redis_server: RedisServer, redis_client: redis.Redis, prefix: str) -> str:
    """Create the documented ACL user on the private server; its gate URL."""
    redis_client.execute_command(*documented_acl(prefix))
    redis_client.execute_command("ACL", "LOG", "RESET")
    return redis_server.url(0, user=USER, password=PASSWORD)


def test_the_documented_acl_line_allows_every_command_the_scripts_call(prefix: str) -> None:
    granted = {w[1:].lower() for w in documented_acl(prefix) if w.startswith("+")}
    missing = script_commands() - granted
    assert not missing, f"add {' '.join('+' + c for c in sorted(missing))} to docs/gate.md"


def test_a_least_privilege_user_runs_every_gate_operation_and_nothing_else(
    acl_user: str, redis_client: redis.Redis, prefix: str
) -> None:
    redis_client.script_flush()  # the user loads the scripts itself
    # Live limits an operator set: a per-key default (the gate's cache reads it) and quotas.
    set_override(redis_client, GATE_CONFIG, prefix, parse_limits(["4/300ms", "1000/1d"]),
                 tool="weighted")
    set_override(redis_client, GATE_CONFIG, prefix, parse_limits(["1000/1d"]), pool="p")
    gate = Gate(acl_user, GATE_CONFIG, prefix=prefix)
    decisions = exercise(gate)
    denied_during_work = acl_denials(redis_client)
    restricted = redis.Redis.from_url(acl_user)
    refused = []
    for command in (
        ("GET", "other-app:secret"), ("SET", f"{prefix}-other:x", "1"), ("KEYS", "*"),
        ("FLUSHALL",), ("CONFIG", "GET", "*"), ("EVAL", "return 1", "0"), ("SCRIPT", "FLUSH"),
        ("DEL", f"{prefix}:{{plain}}:log"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            restricted.execute_command(*command)
        refused.append(command[0])
    print(
        f"\nleast-privilege user: {decisions} decisions and every other gate operation, "
        f"ACL denials {len(denied_during_work)}; refused {', '.join(refused)}"
    )
    assert denied_during_work == [], f"docs/gate.md's line lacks {denied_during_work}"
    restricted.close()
    gate.close()


def test_real_workers_run_a_burst_with_the_least_privilege_user(
    make_cluster: Any, acl_user: str, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    cluster = make_cluster(
        WORKER_CONFIG,
        env={"THROTTLE_REDIS_URL": acl_user, "THROTTLE_TEST_LEDGER_URL": redis_url},
    )
    cluster.start(2, concurrency=2)
    results, _ = burst(cluster, "burst", CALLS)
    outcomes = outcomes_of(results)
    cluster.stop()  # the workers flush their counters as they stop
    runs = ledger(redis_client, prefix)
    most = most_in_window([run["admitted_at"] for run in runs], 1.0)
    denied = acl_denials(redis_client)
    print(
        f"\nworkers as the least-privilege user: {outcomes.count('result')} results, "
        f"{outcomes.count('fallback')} fallbacks of {CALLS}, ACL denials {denied or 0}, most "
        f"admitted in a window {most}/50"
    )
    assert denied == [], f"the ACL line in docs/gate.md lacks {denied}"
    assert len(outcomes) == CALLS
    assert outcomes.count("result") == len(runs) > 0
    assert most <= 50


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    if not tls_supported():
        pytest.skip("this redis-server was built without TLS (it refuses --tls-port)")
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def tls_server(tmp_path: Path, tls_files: TlsFiles) -> Iterator[RedisServer]:
    """A private server with a plain port (broker, results, setup) and a TLS port."""
    with private_redis(
        tmp_path / "tls-redis", tls_port=free_port(), args=tls_files.server_args()
    ) as server:
        yield server


def tls_url(server: RedisServer, files: TlsFiles, auth: str = "") -> str:
    return f"rediss://{auth}127.0.0.1:{server.tls_port}/0?ssl_ca_certs={files.ca}"


def test_the_gate_reaches_redis_over_tls_with_a_self_signed_ca_and_refuses_others(
    tls_server: RedisServer, tls_files: TlsFiles, prefix: str
) -> None:
    gate = Gate(tls_url(tls_server, tls_files), GATE_CONFIG, prefix=prefix)
    decisions = exercise(gate)
    unknown_ca = Gate(f"rediss://127.0.0.1:{tls_server.tls_port}/0", GATE_CONFIG, prefix=prefix)
    with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        unknown_ca.acquire("plain", "m")
    plain = Gate(
        f"redis://127.0.0.1:{tls_server.tls_port}/0", GATE_CONFIG, prefix=prefix,
        socket_timeout_s=1,
    )
    with pytest.raises(StoreUnavailable):
        plain.acquire("plain", "m")
    print(
        f"\nrediss:// with a self-signed CA: {decisions} decisions; an untrusted CA and a "
        "plain client on the TLS port are refused"
    )
    gate.close()


def test_real_workers_reach_the_gate_over_tls_as_the_least_privilege_user(
    tmp_path: Path, tls_server: RedisServer, tls_files: TlsFiles, prefix: str
) -> None:
    """The production shape: TLS, a confined user; broker and results on the plain port."""
    admin = tls_server.client()
    admin.execute_command(*documented_acl(prefix))
    gate_url = tls_url(tls_server, tls_files, auth=f"{USER}:{PASSWORD}@")
    with cluster(
        tmp_path, redis_url=gate_url, prefix=prefix, config=WORKER_CONFIG,
        broker_url=tls_server.url(1), backend_url=tls_server.url(2),
        env={"THROTTLE_TEST_LEDGER_URL": tls_server.url(0)},
    ) as workers:
        workers.start(2, concurrency=2)
        results, _ = burst(workers, "burst", CALLS)
        outcomes = outcomes_of(results)
    runs = ledger(admin, prefix)
    most = most_in_window([run["admitted_at"] for run in runs], 1.0)
    denied = acl_denials(admin)
    print(
        f"\nworkers over rediss:// as the least-privilege user: {outcomes.count('result')} "
        f"results, {outcomes.count('fallback')} fallbacks of {CALLS}, ACL denials "
        f"{denied or 0}, most admitted in a window {most}/50"
    )
    assert denied == [], f"the ACL line in docs/gate.md lacks {denied}"
    assert len(outcomes) == CALLS
    assert outcomes.count("result") == len(runs) > 0
    assert most <= 50
    admin.close()
