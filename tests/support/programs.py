"""Programs some tests drive (promtool, kubectl): skipped where absent, required in CI."""

from __future__ import annotations

import os
import shutil

import pytest

INSTALL = {
    "promtool": "it ships with Prometheus: `apt-get install prometheus` (Debian, Ubuntu), or "
                "the release tarball from https://prometheus.io/download/",
    "kubectl": "see https://kubernetes.io/docs/tasks/tools/ (kubectl includes kustomize)",
}


def require(program: str) -> str:
    """The path of `program`; without it the test skips, or fails when CI is set."""
    path = shutil.which(program)
    if path is not None:
        return path
    message = f"{program} is not installed; {INSTALL[program]}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this test may not skip)")
    pytest.skip(message)
