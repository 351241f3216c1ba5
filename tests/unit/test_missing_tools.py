"""A missing program or RabbitMQ skips outside CI and fails with CI=true; bad RabbitMQ
credentials fail everywhere (only an unreachable server is "missing")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.rabbit import AMQP_URL, require_rabbitmq
from tests.support.servers import ROOT, free_port

PROBES = '''
from tests.support.needs import program
from tests.support.rabbit import rabbitmq_queue

def test_program():
    program("no-such-program-h7q", "no-such-package")

def test_rabbitmq():
    with rabbitmq_queue("tool.probe-missing-tools"):
        pass
'''


def run_probes(tmp_path: Path, amqp_url: str, *, ci: bool) -> str:
    probes = tmp_path / "test_probes.py"
    probes.write_text(PROBES)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(THROTTLE_AMQP_URL=amqp_url, PYTHONPATH=str(ROOT), **({"CI": "true"} if ci else {}))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(probes)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    return done.stdout


def test_outside_ci_a_missing_program_or_rabbitmq_skips_saying_how_to_install(
    tmp_path: Path,
) -> None:
    out = run_probes(tmp_path, f"amqp://guest:guest@127.0.0.1:{free_port()}//", ci=False)
    assert "2 skipped" in out, out
    assert "apt-get install no-such-package" in out
    assert "RabbitMQ does not answer" in out and "make test" in out


def test_in_ci_a_missing_program_or_rabbitmq_fails(tmp_path: Path) -> None:
    out = run_probes(tmp_path, f"amqp://guest:guest@127.0.0.1:{free_port()}//", ci=True)
    assert "2 failed" in out, out
    assert "CI=true and `no-such-program-h7q` is not installed" in out
    assert "CI=true and RabbitMQ does not answer" in out


@pytest.mark.rabbitmq
def test_bad_rabbitmq_credentials_fail_instead_of_skipping(tmp_path: Path) -> None:
    require_rabbitmq()
    parts = urlsplit(AMQP_URL)
    bad = urlunsplit(parts._replace(netloc=f"{parts.username or 'guest'}:wrong-password@"
                                           f"{parts.hostname}:{parts.port or 5672}"))
    out = run_probes(tmp_path, bad, ci=False)
    assert "test_rabbitmq FAILED" in out or "FAILED test_probes.py::test_rabbitmq" in out, out
    assert "ACCESS_REFUSED" in out or "AccessRefused" in out
