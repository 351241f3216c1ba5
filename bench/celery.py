"""Throttle on real Celery workers: overhead, a binding limit, memory, and Celery's rate_limit.

One run starts its own `celery worker` nodes (prefork -c 2, `bench.apps`) against a real Redis
(`THROTTLE_REDIS_URL`, default redis://127.0.0.1:6379/0; broker, results and gate on database
numbers 3, 4 and 5, see `--dbs`), measures, stops them, and deletes every key it made:

1. Overhead   no-op tool calls on a limit that never binds ("1000000/1s") against the same
              no-op as a plain task of the same app, on the same node and settings: enqueue N
              with .delay(), .get() every result; first enqueue to last result. Alternated,
              best of `--rounds`; also the median of the ratios within each round, which
              one lucky run of either contender does not move.
2. Binding    a burst of 2,000 calls at "100/1s" (max_delay 60s) on 3 nodes: all queued
              first, then the nodes start consuming (add_consumer). Bodies record Redis TIME
              at their start, the admission time, the re-publish count and the ETA.
3. Memory     10,000 calls at "10/1s" (max_delay 50m, visibility_timeout 1h) on one node: its
              main process's RSS once it holds them all as ETA tasks, against its idle RSS.
4. Rate       a burst of 400 at "20/1s" against Celery's `rate_limit="20/s"` on the plain app
              (same settings, no FireDueTimers bootstep), with 1 and with 2 nodes, side by side.

Parts 1 and 2 then run again on three gevent nodes (`-P gevent -c 50`, see `--green`), the
pool I/O-bound tools run on, so the two pools' figures stand side by side.

`--quick` shrinks every size; `--parts 2` runs only part 2 (any of the digits 1-4); `--json
PATH` saves all figures; `--check` exits 1 on a MISS.
Each part lives in a module of its own (`bench.celery_overhead`, `celery_binding`,
`celery_memory`, `celery_rates`); `bench.celery_setup` holds the nodes and apps of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.apps import start_nodes, stop_nodes
from bench.celery_binding import binding
from bench.celery_memory import memory
from bench.celery_overhead import overhead
from bench.celery_rates import rates
from bench.celery_setup import MAKESPAN_TARGET, MARGIN_S, RATE, Bench
from bench.measures import Figure, cpu_use, local_redis_pid, rss_bytes
from throttle.routing import SAFE_DEFAULTS
from throttle.store import mask_url

DEFAULT_URL = "redis://127.0.0.1:6379/0"
SIZES = {  # name: (default, --quick)
    "overhead_n": (2000, 400),
    "burst_n": (2000, 500),
    "hold_n": (10_000, 2000),
    "rate_n": (400, 120),
}
GREEN_CONCURRENCY = 50


def run_green(
    bench: Bench, args: argparse.Namespace, sizes: dict[str, int],
    cpu: dict[str, dict[str, float]], console: Console, began: float,
) -> list[Figure]:
    """Parts 1 and 2 on the gevent nodes G0-G2 (the prefork nodes are stopped by then)."""
    pool = f"gevent -c {args.green}"
    console.print(f"{time.monotonic() - began:5.0f}s  starting 3 {pool} nodes ...",
                  highlight=False)
    start_nodes(bench.green_nodes, bench.env, pool="gevent", concurrency=args.green)
    ours = [os.getpid()] + [node.pid for node in bench.green_nodes]
    redis_pid = local_redis_pid(bench.gate)
    figures: list[Figure] = []
    steps: list[tuple[str, Callable[[], list[Figure]]]] = [
        ("1g overhead", lambda: overhead(bench, sizes["overhead_n"], args.rounds, pool,
                                         node=bench.green_nodes[0])),
        ("2g binding limit", lambda: binding(bench, sizes["burst_n"], pool, nodes="G")),
    ]
    for title, step in steps:
        if title[0] not in args.parts:
            continue
        console.print(f"{time.monotonic() - began:5.0f}s  {title} ({pool}) ...", highlight=False)
        with cpu_use(ours, redis_pid) as used:
            figures += step()
        cpu[title.split()[0]] = used
    return figures


def render(figures: list[Figure], notes: list[str], console: Console) -> None:
    table = Table(title="throttle on Celery workers (python -m bench.celery)")
    for column in ("part", "measure", "value", "target", ""):
        table.add_column(column, justify="right" if column == "value" else "left")
    for fig in figures:
        mark = "" if fig.ok is None else ("[green]PASS" if fig.ok else "[red]MISS")
        table.add_row(fig.part, fig.measure, fig.value, fig.target, mark)
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False)


def burst_margin_s(args: argparse.Namespace) -> float:
    """Part 2's slot_margin in seconds."""
    return MARGIN_S if args.burst_margin is None else args.burst_margin / 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.celery",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~1.5 min)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--redis-url", default=os.environ.get("THROTTLE_REDIS_URL", DEFAULT_URL))
    parser.add_argument(
        "--dbs",
        type=int,
        nargs=3,
        default=(3, 4, 5),
        metavar=("BROKER", "RESULTS", "GATE"),
        help="database numbers; broker and results are emptied (default 3 4 5)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="overhead runs per contender")
    parser.add_argument("--rate", type=int, default=RATE, help="limit of part 4, per second")
    parser.add_argument("--parts", default="1234", metavar="DIGITS",
                        help="which parts to run, e.g. 2 or 14 (default 1234)")
    parser.add_argument("--burst-margin", type=float, metavar="MS",
                        help="part 2's slot_margin in ms (default: the tool default, 40)")
    parser.add_argument("--green", type=int, default=GREEN_CONCURRENCY, metavar="C",
                        help="concurrency of the gevent nodes (0: skip them)")
    args = parser.parse_args(argv)
    if not args.parts or set(args.parts) - set("1234"):
        parser.error(f"--parts {args.parts!r}: give part numbers 1 to 4, e.g. --parts 2")
    sizes = {name: pair[1 if args.quick else 0] for name, pair in SIZES.items()}
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    began = time.monotonic()
    figures: list[Figure] = []
    cpu: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp:
        bench = Bench(args, Path(tmp))
        bench.clean()
        nodes = list(bench.nodes.values())
        try:
            console.print(f"starting {len(nodes)} worker nodes ...", highlight=False)
            start_nodes(nodes, bench.env)
            bench.pool_rss_at_start = [rss_bytes(c) for c in bench.nodes["T0"].children]
            steps: list[tuple[str, Callable[[], list[Figure]]]] = [
                ("1 overhead", lambda: overhead(bench, sizes["overhead_n"], args.rounds,
                                                celery_defaults=True, node=bench.nodes["T0"])),
                ("2 binding limit", lambda: binding(bench, sizes["burst_n"])),
                ("4 rate vs Celery rate_limit", lambda: rates(bench, sizes["rate_n"], args.rate)),
                ("3 memory", lambda: memory(bench, sizes["hold_n"])),
            ]
            redis_pid = local_redis_pid(bench.gate)
            ours = [os.getpid()] + [pid for node in nodes for pid in (node.pid, *node.children)]
            for title, step in steps:
                if title[0] not in args.parts:
                    continue
                console.print(f"{time.monotonic() - began:5.0f}s  {title} ...", highlight=False)
                with cpu_use(ours, redis_pid) as used:
                    figures += step()
                cpu[title.split()[0]] = used
        finally:
            stop_nodes(nodes)
        try:
            if args.green:
                figures += run_green(bench, args, sizes, cpu, console, began)
        finally:
            stop_nodes(bench.green_nodes)
            bench.clean()
    figures.sort(key=lambda fig: fig.part[0])  # stable: each part's pools side by side
    host = socket.gethostname()
    notes = [
        f"Redis {mask_url(args.redis_url)} (broker/results/gate dbs {args.dbs}); {host}, "
        f"{os.cpu_count()} CPUs; total {time.monotonic() - began:.0f}s; sizes {sizes}.",
        "Cores used during each part by the shared Redis / by processes not of this benchmark: "
        + ", ".join(f"{k}: {v['redis']:.2f} / {v['others']:.2f}" for k, v in sorted(cpu.items()))
        + " (other processes above ~0.2 cores disturb the figures: rerun).",
        "Nodes: `celery -A bench.apps worker -P prefork -c 2 -l WARNING --without-gossip "
        "--without-mingle --without-heartbeat`; throttle nodes T0-T2, plain nodes P0-P2; "
        f"gevent rows: the same on `-P gevent -c {args.green}`, throttle nodes G0-G2 (run "
        "after the prefork nodes stopped).",
        "Part 1 runs the tool and the plain no-op on node T0 (the throttle app, so the same "
        "settings; its FireDueTimers bootstep is idle without ETA tasks), and the prefork run "
        "a third no-op on node D0, an app left on Celery's defaults. Part 4's Celery rows run on "
        "the plain app: "
        + ", ".join(f"{k}={v}" for k, v in SAFE_DEFAULTS.items() if "accept" not in k)
        + f"; no Throttle, no FireDueTimers bootstep (settings that differ from the throttle "
        f"app's: {bench.settings_differ or 'none'}).",
        "Throttle rows use the default slot_margin (40 ms): delayed calls are spaced window + "
        f"margin apart, so a 1 s window sustains at most 1/1.04 = {1 / 1.04:.3f} of the limit; "
        "the slot_margin 0ms row shows the limit without that cost.",
        "Part 2 queues the whole burst before the nodes consume it. Delayed calls are placed "
        "window + slot_margin apart, so 2,000 calls at 100/1s take 19 windows of "
        f"1 s + margin after the first: makespan / ideal is about 1 + margin/window "
        f"({1 + burst_margin_s(args):.3f} with this run's margin) and the target "
        f"{MAKESPAN_TARGET} needs a slot_margin under {(MAKESPAN_TARGET - 1) * 1000:.0f} ms "
        "(--burst-margin). "
        "Lateness: body start (Redis TIME) minus the ETA of the call's last delivery, over "
        "delayed calls; re-deliveries: the call's throttle_delays. Windows are half-open.",
    ]
    render(figures, notes, console)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "sizes": sizes,
                    "cpu": cpu,
                    "figures": [asdict(f) for f in figures],
                    "notes": notes,
                },
                indent=2,
                default=str,
            )
        )
    missed = any(fig.ok is False for fig in figures)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
