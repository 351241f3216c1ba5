"""`make test`'s set-up scripts, run with Redis, RabbitMQ and the test tools absent from PATH.

PATH holds only the few programs the scripts use, plus shims: `id` says whether we are root,
`apt-get` records what it was asked and "installs" redis-server by linking the real binary
into the shim directory (and fails for every other package). Servers are started on free
ports only; the shared test servers are used as they are and must still answer afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.needs import missing, program
from tests.support.rabbit import address
from tests.support.servers import ROOT, free_port

pytestmark = pytest.mark.redis

TOOLS = ["bash", "env", "mktemp", "chmod", "chown", "seq", "sleep", "cat", "rm", "mkdir",
         "touch", "tail", "grep", "printf", "tr", "od", "ln"]
APT_GET = """#!/bin/sh
echo "$*" >>"{log}"
[ -x "{policy}" ] && echo "policy-rc.d present" >>"{log}"
case "$*" in
    *install*redis-server*) ln -sf "{redis_server}" "{bin}/redis-server" ;;
    *install*) echo "E: Unable to locate package" >&2; exit 100 ;;
esac
"""


class Shims:
    """A PATH directory without redis-server, rabbitmq-server or the test tools."""

    def __init__(self, root: Path, *, uid: int) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.apt_log = root / "apt-get.log"
        self.policy = root / "policy-rc.d"
        for tool in TOOLS:
            found = shutil.which(tool)
            if found:
                (self.bin / tool).symlink_to(found)
        self.write("id", f"#!/bin/sh\necho {uid}\n")

    def write(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def fake_apt_get(self) -> None:
        real = shutil.which("redis-server")
        assert real, "the real redis-server is needed to stand in for an installed one"
        self.write("apt-get", APT_GET.format(log=self.apt_log, policy=self.policy,
                                             redis_server=real, bin=self.bin))

    def run(self, script: str, *cmd: str, ci: bool = False,
            **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k not in {"CI", "THROTTLE_AMQP_URL"}}
        full = {**base, "PATH": str(self.bin), "THROTTLE_PYTHON": sys.executable,
                "THROTTLE_POLICY_RC_D": str(self.policy), **env, **({"CI": "true"} if ci else {})}
        return subprocess.run(["bash", str(ROOT / "scripts" / script), *cmd], cwd=ROOT,
                              env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something listens on (stands in for a RabbitMQ that already answers)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def amqp(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}//"


def test_without_redis_and_without_root_it_stops_and_says_how_to_install(tmp_path: Path) -> None:
    shims = Shims(tmp_path, uid=1000)
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = shims.run("ensure-services.sh", "true", THROTTLE_REDIS_URL=url,
                     THROTTLE_AMQP_URL=amqp(free_port()))
    assert done.returncode == 1, done
    assert "apt-get install redis-server" in done.stdout + done.stderr
    assert not shims.apt_log.exists()


def test_as_root_it_installs_starts_redis_on_loopback_runs_the_command_and_stops_it(
    tmp_path: Path,
) -> None:
    shims = Shims(tmp_path, uid=0)
    shims.fake_apt_get()
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    probe = (f"import redis; c = redis.Redis.from_url('{url}'); c.ping(); "
             "print('bind', c.config_get('bind')['bind'], "
             "'save', repr(c.config_get('save')['save']))")
    done = shims.run("ensure-services.sh", sys.executable, "-c", probe, THROTTLE_REDIS_URL=url,
                     THROTTLE_AMQP_URL=amqp(free_port()))
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done
    apt = shims.apt_log.read_text()
    assert "install -y -qq --no-install-recommends redis-server" in apt
    assert "install -y -qq --no-install-recommends rabbitmq-server" in apt
    assert "policy-rc.d present" in apt  # the package may not start a system service
    assert not shims.policy.exists()  # and the guard is gone afterwards
    assert "bind 127.0.0.1 save ''" in done.stdout
    assert "its tests will skip" in done.stdout
    assert "stopping the redis-server this run started" in done.stdout
    assert not answers(url)


def test_in_ci_a_rabbitmq_it_cannot_install_fails_the_run_and_stops_what_it_started(
    tmp_path: Path,
) -> None:
    shims = Shims(tmp_path, uid=0)
    shims.fake_apt_get()
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = shims.run("ensure-services.sh", "true", ci=True, THROTTLE_REDIS_URL=url,
                     THROTTLE_AMQP_URL=amqp(free_port()))
    assert done.returncode == 1, done
    assert "CI=true and RabbitMQ does not answer" in done.stderr
    assert "apt-get install rabbitmq-server" in done.stderr
    assert not answers(url)


def test_servers_that_already_answer_are_used_and_never_stopped(
    tmp_path: Path, redis_url: str, listener: int,
) -> None:
    shims = Shims(tmp_path, uid=0)
    shims.fake_apt_get()
    done = shims.run("ensure-services.sh", "bash", "-c", "exit 3", ci=True,
                     THROTTLE_REDIS_URL=redis_url, THROTTLE_AMQP_URL=amqp(listener))
    assert done.returncode == 3, done  # the command's own status
    assert "starting" not in done.stdout and "stopping" not in done.stdout
    assert not shims.apt_log.exists()
    assert answers(redis_url)


def test_missing_test_tools_skip_outside_ci_and_fail_in_ci_naming_the_packages(
    tmp_path: Path,
) -> None:
    shims = Shims(tmp_path, uid=1000)
    outside = shims.run("install-test-tools.sh")
    inside = shims.run("install-test-tools.sh", ci=True)
    assert outside.returncode == 0 and "will skip" in outside.stdout, outside
    assert inside.returncode == 1, inside
    assert ("apt-get install prometheus chromium chromium-driver docker-compose"
            in inside.stderr)


def test_test_tools_apt_get_cannot_install_fail_the_run_in_ci(tmp_path: Path) -> None:
    shims = Shims(tmp_path, uid=0)
    shims.fake_apt_get()
    done = shims.run("install-test-tools.sh", ci=True)
    assert done.returncode == 1, done
    assert "install -y -qq --no-install-recommends prometheus" in shims.apt_log.read_text()
    missing = "CI=true and prometheus promtool chromium chromedriver docker-compose missing"
    assert missing in done.stderr


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_rabbitmq_it_starts_listens_on_loopback_with_the_urls_vhost_and_is_stopped_after(
    tmp_path: Path,
) -> None:
    """The real rabbitmq-server (Debian's wrapper runs it as the rabbitmq user, so as root),
    on a free port, beside the machine's own RabbitMQ, which must still answer afterwards."""
    program("rabbitmq-server", "rabbitmq-server")
    if os.getuid() != 0:
        missing("starting rabbitmq-server needs root", "run the tests as root (CI does)")
    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/probe-vhost"
    probe = ("import kombu, socket; c = kombu.Connection(" + repr(url) + "); "
             "c.ensure_connection(max_retries=1); c.release(); "
             f"s = socket.create_connection(('127.0.0.1', {port})); "
             "print('local', s.getsockname()[0], 'peer', s.getpeername()[0])")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ensure-services.sh"), sys.executable, "-c", probe],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**env, "THROTTLE_PYTHON": sys.executable, "THROTTLE_AMQP_URL": url},
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done
    node = f"throttle-test-{port}@localhost"
    assert f"starting RabbitMQ node {node} on 127.0.0.1:{port}" in done.stdout
    assert "peer 127.0.0.1" in done.stdout
    assert "stopping the RabbitMQ node this run started" in done.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    shared = address()
    socket.create_connection(shared, timeout=5).close()  # the machine's own is untouched
