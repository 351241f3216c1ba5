"""Flower's settings file for `throttle flower` (passed as `--conf`; Flower executes it).

Task pages and Flower's task API then show the call fields throttle's `task-delayed` and
`task-fallback` events carry (see `show_call_fields`).
"""

from __future__ import annotations

from throttle.monitor.flower import show_call_fields

show_call_fields()
