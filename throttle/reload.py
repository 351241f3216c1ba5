"""Reload the tools file on SIGHUP, validating it first; a bad file keeps the running config.

A worker's main process validates the file and swaps its config; its pool processes see the
reload (a counter in memory shared across the fork, see `Throttle.reload`) and load the
file at their next call. Limits, deadlines, schemas and fallbacks change in place; adding
or removing a tool changes the queues a worker consumes and needs a restart. The gateway
and the exporter use `reload_file` and `install` too.

Celery's own SIGHUP handler restarts the worker (`execv`): with a bad file the restarted
worker would not come back, so throttle replaces it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from throttle.config import Config
from throttle.config_file import load_config
from throttle.errors import ConfigError, ThrottleError

logger = logging.getLogger("throttle")


def reload_file(current: Config) -> Config:
    """The file `current` was loaded from, loaded again; a ConfigError if it is bad or
    its tools differ (new queues need a restart)."""
    path = Path(current.source)
    if current.source == "<mapping>" or not path.is_file():
        raise ConfigError(f"the running config came from {current.source}, not a file that "
                          "can be read again; start with a tools file to reload it on SIGHUP")
    new = load_config(path)
    if set(new.tools) != set(current.tools):
        added, removed = sorted(set(new.tools) - set(current.tools)), sorted(
            set(current.tools) - set(new.tools))
        raise ConfigError(f"{path}: tools added {added} or removed {removed}; the queues a "
                          "worker consumes change only with a restart")
    return new


def install(apply: Callable[[], object], what: str) -> None:
    """Run `apply` on SIGHUP; a ThrottleError it raises is logged and the old config kept."""
    def on_hangup(signum: int, frame: FrameType | None) -> None:
        try:
            apply()
        except ThrottleError as exc:
            logger.error("%s: reload refused, the running config is kept: %s", what, exc)
        except Exception:  # a reload must never take the process down
            logger.exception("%s: reload failed, the running config is kept", what)
        else:
            logger.warning("%s: tools file reloaded", what)

    if threading.current_thread() is not threading.main_thread():
        logger.debug("%s: not the main thread, no SIGHUP handler installed", what)
        return
    signal.signal(signal.SIGHUP, on_hangup)
