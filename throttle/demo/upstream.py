"""The model API the demo's LLM tool calls: `throttle stub-llm` in a subprocess.

It listens on a free port of 127.0.0.1 for the demo's length; the LLM tool's settings
(THROTTLE_LLM_BASE_URL, _MODEL, _API_KEY) point at it in this process's environment, which
the in-process worker reads and the worker processes inherit, and are restored at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from throttle.demo.real import DemoError, stop_processes

STUB_LATENCY_S = 0.05
STUB_MODEL = "stub-1"
STUB_KEY = "demo"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_READY = "listening on "


@contextmanager
def stub_upstream() -> Iterator[str]:
    """Start the stub, point the LLM tool at it, and yield its API root (`http://.../v1`)."""
    with tempfile.TemporaryDirectory(prefix="throttle-demo-llm-") as folder:
        log_path = Path(folder) / "stub-llm.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "throttle.cli", "stub-llm", "--port", "0",
                 "--latency", f"{STUB_LATENCY_S:g}", "--model", STUB_MODEL],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            url = _wait_ready(proc, log_path)
            settings = {"THROTTLE_LLM_BASE_URL": url, "THROTTLE_LLM_MODEL": STUB_MODEL,
                        "THROTTLE_LLM_API_KEY": STUB_KEY}
            before = {name: os.environ.get(name) for name in settings}
            os.environ.update(settings)
            try:
                yield url
            finally:
                for name, value in before.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        finally:
            stop_processes([proc], STOP_TIMEOUT_S)


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        text = log_path.read_text(errors="replace")
        if _READY + "http://" in text:
            return text.split(_READY, 1)[1].split()[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DemoError(f"the demo's stub LLM upstream (throttle stub-llm) did not "
                            f"start:\n{text[-2000:]}")
        time.sleep(0.05)


