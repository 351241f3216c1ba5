"""The built wheel is the library a web app needs: installed into a fresh virtualenv, away
from the repository, it makes a decision against Redis without any extra, and each command
that needs an extra says which one to install."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from throttle.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
EXTRA_MODULES = sorted({module for modules in EXTRAS.values() for module in modules})

DECIDE = """
import sys
import throttle
from throttle import Action, Gate, load_config
assert "site-packages" in throttle.__file__, throttle.__file__
gate = Gate(sys.argv[1], load_config(sys.argv[2]), prefix=sys.argv[3])
first = gate.acquire("lookup", "call-1")
second = gate.acquire("lookup", "call-2")
print(first.action, second.action)
"""

CONFIG = """
[tools.lookup]
limits = ["1/60s"]
max_delay = "2m"
params = { type = "object" }
"""


def _run(cmd: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          **kw)  # type: ignore[call-overload]


@pytest.mark.slow
@pytest.mark.redis
def test_the_wheel_installs_alone_and_decides_against_redis(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                  str(tmp_path / "dist"), str(ROOT)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("throttle-*.whl"))
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]

    (tmp_path / "tools.toml").write_text(CONFIG)
    decided = _run([str(python), "-c", DECIDE, redis_url, "tools.toml", prefix], cwd=tmp_path)
    assert decided.returncode == 0, decided.stderr[-2000:]
    assert decided.stdout.split() == ["admit", "delay"]

    # The core install carries none of the extras' modules, and ships its typing marker.
    absent = _run([str(python), "-c", "import importlib.util as u, sys; "
                   "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))",
                   *EXTRA_MODULES], cwd=tmp_path)
    assert absent.stdout.split() == []
    typed = _run([str(python), "-c", "import importlib.resources as r; "
                  "print(r.files('throttle').joinpath('py.typed').is_file())"], cwd=tmp_path)
    assert typed.stdout.strip() == "True"

    throttle_cmd = tmp_path / "venv" / "bin" / "throttle"
    for command, extra in (("gateway", "gateway"), ("demo", "demo"), ("stub-llm", "demo"),
                           ("flower", "flower")):
        refused = _run([str(throttle_cmd), command], cwd=tmp_path)
        assert refused.returncode != 0
        assert f"pip install 'throttle[{extra}]'" in refused.stdout + refused.stderr, command
