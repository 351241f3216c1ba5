"""What live limits cost a decision: Gate decisions/s with overrides present vs absent.

What it measures
    Pairs of tools configured alike, one with a live override (`throttle limits set`) and one
    without, each decided by `Gate.acquire` with a fresh member per call on a limit that
    never binds (every call ADMIT), against a real Redis (`THROTTLE_REDIS_URL`):

    tool override        a tool's override, read by the script in the same call (HMGET)
    tier override        a tier for the call's key value, read the same way
    per-key default      a per-key tool's default, cached by the gate and passed in ARGV
                         (its version checked every 0.5 s)
    quota override       a tool's daily quota set live, vs the same quota from the file

How it runs
    `--rounds` rounds (default 21); in each, every pair times `--n` calls (default 2,000)
    per side, cut into slices of 100 that alternate A B B A ..., so load from other
    processes lands on both sides alike. A round's ratio is the with-override rate over the
    without-override rate. Reported per pair: the median ratio over the rounds, its spread
    (the range of the middle half of rounds, and min-max) and the target (median >= 0.95x).
    Keys live under a fresh prefix, deleted at the end. `--json PATH` writes every number;
    `--check` exits 1 when a median misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from bench.gate import DEFAULT_URL
from bench.gate_contenders import delete_prefix
from throttle import Action, Gate, load_config
from throttle.overrides import parse_limits, set_override
from throttle.store import mask_url

DEFAULT_N = 2_000
DEFAULT_ROUNDS = 21
SLICE = 100
TARGET = 0.95
NEVER_BINDS = "10000000/10m"
LIVE = "20000000/10m"  # as the file's: one window that never binds
QUOTA = "1000000000/1d"

# (pair, label, tool without the override, tool with it)
PAIRS = (
    ("tool", "tool override (read by the script)", "plain_a", "plain_b"),
    ("tier", "tier override (read by the script)", "keyed_a", "keyed_b"),
    ("default", "per-key default (cached, in ARGV)", "keyed_a", "keyed_c"),
    ("quota", "daily quota set live vs the file's", "quota_a", "quota_b"),
)
CONFIG = {
    "tools": {
        **{name: {"limits": [NEVER_BINDS], "max_delay": "10m"} for name in ("plain_a", "plain_b")},
        **{name: {"limits": [NEVER_BINDS], "max_delay": "10m", "key": "tenant"}
           for name in ("keyed_a", "keyed_b", "keyed_c")},
        "quota_a": {"limits": [NEVER_BINDS, QUOTA], "max_delay": "10m"},
        "quota_b": {"limits": [NEVER_BINDS], "max_delay": "10m"},
    }
}


def _set_overrides(client: redis.Redis, prefix: str) -> None:
    config = load_config(CONFIG)
    live = parse_limits([LIVE])
    set_override(client, config, prefix, live, tool="plain_b", set_by="bench")
    set_override(client, config, prefix, live, tool="keyed_b", key="acme", set_by="bench")
    set_override(client, config, prefix, live, tool="keyed_c", set_by="bench")
    set_override(client, config, prefix, parse_limits([QUOTA]), tool="quota_b", set_by="bench")


def _timed(gate: Gate, tool: str, count: int) -> float:
    key = "acme" if tool.startswith("keyed") else None
    members = [uuid.uuid4().hex for _ in range(count)]
    start = time.perf_counter()
    for member in members:
        if gate.acquire(tool, member, key=key).action is not Action.ADMIT:
            raise RuntimeError(f"{tool}: a call was not admitted; the bench limits must never "
                               "bind")
    return time.perf_counter() - start


def run(url: str, n: int, rounds: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Time every pair over `rounds` interleaved rounds; the per-round ratios."""
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    admin = redis.Redis.from_url(url)
    gate = Gate(url, load_config(CONFIG), prefix=prefix)
    ratios: dict[str, list[float]] = {pair: [] for pair, *_ in PAIRS}
    try:
        _set_overrides(admin, prefix)
        for _, _, absent, present in PAIRS:  # warm-up (and the gate's first cache read)
            _timed(gate, absent, SLICE)
            _timed(gate, present, SLICE)
        for round_no in range(rounds):
            progress(f"round {round_no + 1}/{rounds}")
            for pair, _, absent, present in PAIRS:
                spent = {absent: 0.0, present: 0.0}
                for index in range(0, n, SLICE):
                    order = (absent, present) if index // SLICE % 2 == 0 else (present, absent)
                    for tool in order:
                        spent[tool] += _timed(gate, tool, min(SLICE, n - index))
                ratios[pair].append(spent[absent] / spent[present])
    finally:
        gate.close()
        delete_prefix(admin, prefix)
        admin.close()
    return {"n": n, "rounds": rounds, "redis_url": mask_url(url), "ratios": ratios}


def summary(ratios: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of one pair's per-round ratios."""
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2],
            "min": min(ratios), "max": max(ratios)}


def report(result: dict[str, Any], console: Console) -> bool:
    """Print the table; True when every median meets the target."""
    table = Table(title=f"live limits: decisions/s with an override over without, "
                  f"{result['rounds']} interleaved rounds of {result['n']:,} calls per side, "
                  f"{result['redis_url']}")
    for column in ("override", "median", "middle half", "min-max", f">= {TARGET}x"):
        table.add_column(column, justify="left" if column == "override" else "right")
    ok = True
    result["summary"] = {}
    for pair, label, _, _ in PAIRS:
        found = summary(result["ratios"][pair])
        result["summary"][pair] = found
        passed = found["median"] >= TARGET
        ok = ok and passed
        table.add_row(label, f"{found['median']:.3f}x", f"{found['q1']:.3f}-{found['q3']:.3f}",
                      f"{found['min']:.3f}-{found['max']:.3f}",
                      "[green]PASS[/green]" if passed else "[red]MISS[/red]")
    console.print(table)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overrides", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="calls per side and round")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        parser.error("--n and --rounds must be at least 1")
    url = os.environ.get("THROTTLE_REDIS_URL") or DEFAULT_URL
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        console.print(f"[red]cannot reach Redis at {mask_url(url)}: {exc}[/red]; start it "
                      "(make services) or set THROTTLE_REDIS_URL")
        return 2
    with console.status("warming up") as status:
        result = run(url, args.n, args.rounds, lambda text: status.update(text))
    ok = report(result, console)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        console.print(f"numbers written to {args.json}")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
