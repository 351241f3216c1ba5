"""A PNG per run: for each tool, calls sent and admitted per second against the limit's rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from throttle.config import Config
from throttle.demo.tracker import Tracker

STEP_S = 0.1


def write_chart(
    path: Path, tracker: Tracker, config: Config, started_at: float, title: str
) -> None:
    """Sent, admitted and fallen-back calls per second, the trailing-window rate and the limit
    (for a tool with a cost, such as the LLM tool: admitted tokens per second)."""
    tools = [tool for tool in config.tools.values() if tracker.calls_of(tool.name)]
    figure, axes = plt.subplots(
        len(tools), 1, figsize=(12, 2.4 * len(tools) + 0.8), sharex=True, squeeze=False
    )
    end_s = max(
        (moment - started_at for call in tracker.calls.values()
         for moment in (call.sent_at, call.admitted_at, call.finished_at) if moment is not None),
        default=1.0,
    )
    bins = np.arange(0.0, np.ceil(end_s) + 1.0, 1.0)
    for axis, tool in zip(axes[:, 0], tools, strict=True):
        calls = tracker.calls_of(tool.name)
        # A tool with a cost (the LLM tool) is limited in its units (tokens), not in calls.
        costed = isinstance(tool.cost, str)
        unit = "tokens" if costed else "calls"
        done = sorted((call.admitted_at - started_at, call.units if costed else 1.0)
                      for call in calls if call.admitted_at is not None)
        admitted = np.array([at for at, _ in done])
        cumulative = np.concatenate([[0.0], np.cumsum([units for _, units in done])])
        if not costed:
            sent = [call.sent_at - started_at for call in calls]
            axis.hist(sent, bins, histtype="step", color="0.55", label="sent /s")
        axis.hist(admitted, bins, weights=[units for _, units in done], color="tab:blue",
                  alpha=0.6, label=f"admitted {unit} /s")
        fallbacks = [call.finished_at - started_at for call in calls
                     if call.outcome == "fallback" and call.finished_at is not None]
        if fallbacks and not costed:
            axis.hist(fallbacks, bins, histtype="step", color="tab:orange", label="fallbacks /s")
        limit = min(tool.limits, key=lambda item: item.max / item.window_ms)
        window_s = limit.window_ms / 1000
        grid = np.arange(0.0, end_s + STEP_S, STEP_S)
        in_window = (cumulative[np.searchsorted(admitted, grid, side="right")]
                     - cumulative[np.searchsorted(admitted, grid - window_s, side="right")])
        axis.plot(grid, in_window / window_s, color="tab:green",
                  label=f"admitted in the last {limit.window_ms / 1000:g} s, per second")
        per_key = " per key" if tool.key else ""
        axis.axhline(limit.max / window_s, color="tab:red", linestyle="--",
                     label=f"limit {limit}{per_key} = {limit.max / window_s:.1f}/s")
        axis.set_title(tool.name, loc="left", fontsize=10)
        axis.set_ylabel(f"{unit} / s")
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("seconds since the first call")
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
