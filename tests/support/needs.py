"""What a test does when a program or service it needs is missing: skip, or fail in CI.

Outside CI a missing tool is a skip that says how to get it. In CI (`CI=true`) the same gap
fails the test: a run that silently skipped Prometheus or RabbitMQ would pass while proving
nothing about them. `make test` installs and starts all of them where apt-get can be used.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when the environment says this run is CI (`CI=true`, `CI=1`)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(what: str, how: str) -> NoReturn:
    """Skip (outside CI) or fail (in CI) because `what` is missing; `how` says how to fix it."""
    message = f"{what}; {how}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def program(name: str, package: str) -> str:
    """The path of program `name`, or skip / fail naming the Debian `package` that has it."""
    path = shutil.which(name)
    if path is None:
        missing(f"`{name}` is not installed",
                f"install it with `apt-get install {package}` (as root, `make test` does)")
    return path
