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

`--quick` shrinks every size; `--json PATH` saves all figures; `--check` exits 1 on a MISS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from rich.console import Console
from rich.table import Table

from bench.apps import Node, build, start_nodes, stop_nodes
from throttle import fallback_reason
from throttle.routing import SAFE_DEFAULTS
from throttle.store import mask_url
from throttle.windows import most_in_window

DEFAULT_URL = "redis://127.0.0.1:6379/0"
SIZES = {  # name: (default, --quick)
    "overhead_n": (2000, 400),
    "burst_n": (2000, 500),
    "hold_n": (10_000, 2000),
    "rate_n": (400, 120),
}
BURST_LIMIT, RATE = 100, 20
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: one list per priority step, q + sep + p
GREEN_CONCURRENCY = 50
MARGIN_S = 0.040  # the default slot_margin, whose cost shows in the makespan and rates


@dataclass
class Figure:
    part: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target
    raw: Any = None


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def tools_config(rate: int) -> dict[str, Any]:
    rated = {"limits": [f"{rate}/1s"], "max_delay": "60s"}
    return {
        "broker": {"visibility_timeout": "1h"},
        "tools": {
            "noop": {"limits": ["1000000/1s"], "max_delay": "60s"},
            "burst": {"limits": [f"{BURST_LIMIT}/1s"], "max_delay": "60s"},
            "hold": {"limits": ["10/1s"], "max_delay": "50m"},
            "rated_one": rated,
            "rated_two": rated,
            "rated_nomargin": {**rated, "slot_margin": "0ms"},
        },
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (psutil if installed, else /proc)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    return int(psutil.Process(pid).memory_info().rss)


def _cpu_ticks(groups: Sequence[Sequence[int]]) -> list[int]:
    """Ticks the machine was busy so far, then the ticks each group of pids ran (/proc)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    out = [sum(fields) - fields[3] - fields[4]]  # all but idle and iowait
    for pids in groups:
        out.append(0)
        for pid in pids:
            with suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[-1] += int(stat[11]) + int(stat[12])  # utime, stime
    return out


def local_redis_pid(client: redis.Redis) -> int | None:
    """The pid of the Redis server if it runs on this machine, else None."""
    pid = int(client.info("server").get("process_id", 0))
    with suppress(OSError):
        if "redis" in Path(f"/proc/{pid}/comm").read_text():
            return pid
    return None


@contextmanager
def cpu_use(ours: Sequence[int], redis_pid: int | None) -> Iterator[dict[str, float]]:
    """Yields a dict that holds, afterwards, the cores Redis and all other processes used."""
    out: dict[str, float] = {}
    groups = [ours, [redis_pid] if redis_pid else []]
    before, start = _cpu_ticks(groups), time.monotonic()
    yield out
    busy, own, server = (b - a for a, b in zip(before, _cpu_ticks(groups), strict=True))
    per_s = os.sysconf("SC_CLK_TCK") * (time.monotonic() - start)
    out.update(redis=server / per_s, others=(busy - own - server) / per_s)


def wait_until(done: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


class Bench:
    """The workers, the client app and the Redis connections of one run."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        base = args.redis_url
        broker_db, backend_db, gate_db = args.dbs
        if 0 in (broker_db, backend_db):
            raise SystemExit("db 0 is shared: broker and result databases are emptied")
        self.urls = {
            "broker": with_db(base, broker_db),
            "backend": with_db(base, backend_db),
            "gate": with_db(base, gate_db),
        }
        self.prefix = f"bench-celery-{uuid.uuid4().hex[:8]}"
        self.env = {
            "BENCH_REDIS_URL": self.urls["gate"],
            "BENCH_BROKER_URL": self.urls["broker"],
            "BENCH_RESULT_BACKEND": self.urls["backend"],
            "BENCH_PREFIX": self.prefix,
            "BENCH_CONFIG": json.dumps(tools_config(args.rate)),
            "BENCH_RATE_LIMIT": f"{args.rate}/s",
        }
        self.app, _, self.tasks = build(self.env)
        plain_app, _, _ = build({**self.env, "BENCH_APP": "plain"})
        self.settings_differ = [
            key for key in SAFE_DEFAULTS if plain_app.conf[key] != self.app.conf[key]
        ]
        self.gate = redis.Redis.from_url(self.urls["gate"])
        self.broker = redis.Redis.from_url(self.urls["broker"])
        self.pool_rss_at_start: list[int] = []
        node = lambda name, app, *queues: Node(name, app, queues, log_dir / f"{name}.log")  # noqa: E731
        self.nodes = {
            n.name: n
            for n in (
                # tool.burst is consumed only once the whole burst is queued (add_consumer)
                node(
                    "T0",
                    "throttle",
                    "tool.noop",
                    "plain.noop",
                    "tool.rated_one",
                    "tool.rated_two",
                    "tool.hold",
                ),
                node("T1", "throttle", "tool.rated_two"),
                node("T2", "throttle", "tool.rated_nomargin"),
                node("P0", "plain", "plain.rated_one"),
                node("P1", "plain", "plain.rated_two"),
                node("P2", "plain", "plain.rated_two"),
            )
        }
        # The same roles on gevent: G0 as T0 for part 1, G0-G2 as T0-T2 for part 2.
        self.green_nodes = [
            Node(name, "throttle", queues, log_dir / f"{name}.log")
            for name, queues in (("G0", ("tool.noop", "plain.noop")), ("G1", ("bench.idle",)),
                                 ("G2", ("bench.idle",)))
        ]

    def clean(self) -> None:
        for name in ("broker", "backend"):
            client = redis.Redis.from_url(self.urls[name])
            keys = list(client.scan_iter(count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        keys = list(self.gate.scan_iter(match=f"{self.prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            self.gate.delete(*keys[start : start + 500])

    def records(self, run: str) -> list[dict[str, Any]]:
        """What the bodies of run `run` recorded: start (Redis TIME), delays, eta, admission."""
        out = []
        for raw in self.gate.lrange(f"{self.prefix}:rec:{run}", 0, -1):
            at, _, rest = raw.decode().partition(" ")
            delays, eta, admitted, host = json.loads(rest)
            eta_s = dt.datetime.fromisoformat(eta).timestamp() if eta else None
            out.append(
                {
                    "at": float(at),
                    "delays": delays,
                    "eta": eta_s,
                    "admitted": admitted,
                    "host": host,
                }
            )
        return out

    def recorded(self, run: str) -> int:
        return int(self.gate.llen(f"{self.prefix}:rec:{run}"))

    def redis_now(self) -> float:
        sec, usec = self.gate.time()
        return sec + usec / 1e6

    def queue_length(self, queue: str) -> int:
        # kombu's Redis transport keeps one list per priority step: q, q\x06\x163, ...
        names = [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]
        return sum(int(self.broker.llen(name)) for name in names)

    # -- 1 ----------------------------------------------------------------------------
    def overhead(self, n: int, rounds: int, pool: str = "prefork -c 2") -> list[Figure]:
        contenders = {"throttle": self.tasks["noop"], "plain": self.tasks["plain.noop"]}

        def timed(task: Any, count: int) -> float:
            start = time.perf_counter()
            results = [task.delay() for _ in range(count)]
            for result in results:
                result.get(timeout=120)
            return time.perf_counter() - start

        for task in contenders.values():
            timed(task, 100)  # warm up: connections, scripts, pool processes
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for index in range(rounds):
            order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
            for name in order:
                seconds[name].append(timed(contenders[name], n))
        rate = {name: n / min(values) for name, values in seconds.items()}
        ratio = rate["throttle"] / rate["plain"]
        # Each round's two runs are back to back: their ratio shares the machine's state.
        paired = sorted(p / t for t, p in zip(seconds["throttle"], seconds["plain"], strict=True))
        part = f"1 overhead {pool}"
        return [
            Figure(
                part,
                "plain Celery no-op, calls/s",
                f"{rate['plain']:.0f}",
                raw=seconds["plain"],
            ),
            Figure(
                part,
                "throttle no-op (never binds), calls/s",
                f"{rate['throttle']:.0f}",
                raw=seconds["throttle"],
            ),
            Figure(part, "throttle / plain", f"{ratio:.3f}", ">= 0.90", ratio >= 0.9),
            Figure(
                part,
                f"throttle / plain within each round, median (min-max of {rounds})",
                f"{percentile(paired, 50):.3f} ({paired[0]:.2f}-{paired[-1]:.2f})",
                raw=paired,
            ),
        ]

    # -- 2 ----------------------------------------------------------------------------
    def binding(self, n: int, pool: str = "prefork -c 2", nodes: str = "T") -> list[Figure]:
        run = uuid.uuid4().hex[:8]
        ideal_s = n / BURST_LIMIT - 1
        start = time.monotonic()
        results = [self.tasks["burst"].delay(run=run) for _ in range(n)]
        enqueue_s = time.monotonic() - start
        # The whole burst waits in the queue before any node consumes it: a real burst,
        # whatever the speed of this one enqueueing process.
        names = [f"{nodes}{index}@{socket.gethostname()}" for index in range(3)]
        replies = self.app.control.add_consumer("tool.burst", destination=names, reply=True)
        if len(replies) != len(names):
            raise RuntimeError(f"add_consumer tool.burst answered {replies}")
        began = self.redis_now()
        # First deliveries carry priority 9 (their own list), re-published calls priority 0.
        wait_until(lambda: not self.broker.llen(f"tool.burst{PRIORITY_SEP}9"), 120, 0.05)
        first_pass_s = self.redis_now() - began
        wait_until(lambda: self.recorded(run) >= n, ideal_s * 1.6 + 30, 0.5)
        recs = self.records(run)
        fallbacks = 0
        if len(recs) < n:
            fallbacks = sum(fallback_reason(result) is not None for result in results)
        admitted = [r["admitted"] for r in recs]
        makespan = max(admitted) - min(admitted)
        delayed = [r for r in recs if r["delays"] >= 1]
        redeliveries = [r["delays"] for r in delayed]
        late_ms = [(r["at"] - r["eta"]) * 1000 for r in delayed if r["eta"]]
        p50, p99 = percentile(late_ms, 50), percentile(late_ms, 99)
        calm_ms = [(r["at"] - r["eta"]) * 1000 for r in delayed if r["eta"] > began + first_pass_s]
        top_admit, top_start = (int(most_in_window(times, 1.0))
                                for times in (admitted, [r["at"] for r in recs]))
        ratio = makespan / ideal_s
        cap = 1 + MARGIN_S + 0.01
        part = f"2 binding {BURST_LIMIT}/1s x3 {pool}"
        return [
            Figure(
                part,
                f"calls run / enqueued (fallbacks {fallbacks}; queued in {enqueue_s:.1f}s)",
                f"{len(recs)}/{n}",
                f"= {n}",
                len(recs) == n,
            ),
            Figure(
                part,
                f"makespan / ideal ({makespan:.2f}s / {ideal_s:.0f}s)",
                f"{ratio:.3f}",
                f"<= {cap:.2f}",
                ratio <= cap,
            ),
            Figure(
                part,
                f"re-deliveries per delayed call, mean (of {len(delayed)})",
                f"{_mean(redeliveries):.3f}",
                "<= 1.0",
                _mean(redeliveries) <= 1.0,
            ),
            Figure(
                part,
                "re-deliveries per delayed call, max (calls with >= 2)",
                f"{max(redeliveries, default=0)} ({sum(d >= 2 for d in redeliveries)})",
            ),
            Figure(
                part,
                "lateness vs ETA, p50 / p99 / max ms",
                f"{p50:.1f} / {p99:.1f} / {max(late_ms, default=math.nan):.1f}",
                "p99 <= 50",
                p99 <= 50,
            ),
            Figure(
                part,
                f"  of calls due after every call met the gate once ({first_pass_s:.1f}s), "
                f"p50 / p99 ms (of {len(calm_ms)})",
                f"{percentile(calm_ms, 50):.1f} / {percentile(calm_ms, 99):.1f}",
                raw={"first_pass_s": first_pass_s},
            ),
            Figure(
                part,
                "most admitted in any 1 s window",
                f"{top_admit}",
                f"<= {BURST_LIMIT}",
                top_admit <= BURST_LIMIT,
            ),
            Figure(
                part,
                "most body starts in any 1 s window",
                f"{top_start}",
                f"<= {BURST_LIMIT}",
                top_start <= BURST_LIMIT,
            ),
        ]

    # -- 3 ----------------------------------------------------------------------------
    def memory(self, n: int) -> list[Figure]:
        node = self.nodes["T0"]
        time.sleep(1)
        idle = rss_bytes(node.pid)
        held_keys = [f"{self.prefix}:{{hold}}:{kind}" for kind in ("log", "rsv")]
        start = time.monotonic()
        for _ in range(n):
            self.tasks["hold"].apply_async(ignore_result=True)
        enqueue_s = time.monotonic() - start
        scheduled = reserved = 0

        def all_held() -> bool:
            nonlocal scheduled, reserved
            if self.queue_length("tool.hold") > 0:
                return False
            reserved = int(self.gate.zcard(held_keys[1]))
            replies = self.app.control.inspect(timeout=5).scheduled() or {}
            scheduled = sum(len(v) for k, v in replies.items() if k.startswith("T0@"))
            return scheduled >= reserved - 2 and reserved > 0

        held_ok = wait_until(all_held, 240, 1.0)
        took_s = time.monotonic() - start
        rss = rss_bytes(node.pid)
        pool_rss = [rss_bytes(child) for child in node.children]
        gate_bytes = sum(int(self.gate.memory_usage(key) or 0) for key in held_keys)
        broker_bytes = sum(
            int(self.broker.memory_usage(k) or 0) for k in ("unacked", "unacked_index")
        )
        per_call = (rss - idle) / max(1, scheduled)
        part = "3 memory 10/1s, 1 node"
        return [
            Figure(
                part,
                f"calls held as ETA tasks, of {n} ({took_s:.0f}s; enqueue {enqueue_s:.0f}s)",
                f"{scheduled}",
                f">= reserved ({reserved})",
                held_ok and scheduled >= reserved - 2,
            ),
            Figure(
                part,
                "worker main RSS idle -> holding, MiB",
                f"{idle / 2**20:.1f} -> {rss / 2**20:.1f}",
                raw={"idle": idle, "held": rss},
            ),
            Figure(part, "RSS per held call, KiB", f"{per_call / 1024:.2f}"),
            Figure(
                part,
                "pool processes RSS at start -> now, MiB",
                ", ".join(
                    f"{a / 2**20:.0f} -> {b / 2**20:.0f}"
                    for a, b in zip(self.pool_rss_at_start, pool_rss, strict=False)
                ),
                raw={"start": self.pool_rss_at_start, "now": pool_rss},
            ),
            Figure(
                part,
                "Redis: gate log + reservations, B per call",
                f"{gate_bytes / max(1, scheduled):.0f}",
            ),
            Figure(
                part,
                "Redis: broker unacked messages, B per call",
                f"{broker_bytes / max(1, scheduled):.0f}",
            ),
        ]

    # -- 4 ----------------------------------------------------------------------------
    def rates(self, n: int, rate: int) -> list[Figure]:
        plain = self.tasks["plain.rated"]
        rounds = [
            [
                ("throttle", self.tasks["rated_one"], None, 1),
                ("throttle, slot_margin 0ms", self.tasks["rated_nomargin"], None, 1),
                ("celery rate_limit", plain, "plain.rated_one", 1),
            ],
            [
                ("throttle", self.tasks["rated_two"], None, 2),
                ("celery rate_limit", plain, "plain.rated_two", 2),
            ],
        ]
        figures = []
        for contenders in rounds:
            runs = {label: uuid.uuid4().hex[:8] for label, *_ in contenders}
            for _ in range(n):  # interleaved: no contender gets a head start
                for label, task, queue, _nodes in contenders:
                    options = {"queue": queue} if queue else {}
                    task.apply_async(kwargs={"run": runs[label]}, ignore_result=True, **options)
            cap_s = n / rate * 1.5 + 5
            ids = list(runs.values())
            wait_until(lambda ids=ids: all(self.recorded(r) >= n for r in ids), cap_s, 0.5)
            cut = self.redis_now()
            for label, _task, _queue, nodes in contenders:
                figures += self._rate_figures(label, nodes, self.records(runs[label]), n, rate, cut)
        return figures

    def _rate_figures(
        self, label: str, nodes: int, recs: list[dict[str, Any]], n: int, rate: int, cut: float
    ) -> list[Figure]:
        starts = sorted(r["at"] for r in recs)
        # From the 10% point, a whole number of limit-sized groups up to the 90% point: the
        # same phase of throttle's window-by-window admissions at both ends.
        lo = round(0.1 * (n - 1))
        hi = lo + rate * ((round(0.9 * (n - 1)) - lo) // rate)
        if len(starts) > hi:
            steady = (hi - lo) / (starts[hi] - starts[lo])
        elif len(starts) > lo:  # an unfinished run: what it ran until we stopped waiting
            steady = (len(starts) - 1 - lo) / (cut - starts[lo])
        else:
            steady = len(starts) / max(1e-9, cut - starts[0]) if starts else 0.0
        top = int(most_in_window(starts, 1.0))
        part = f"4 rate {rate}/s, {nodes} node{'s' if nodes > 1 else ''}"
        done = f"{len(starts)}/{n} ran" + ("" if len(starts) >= n else " before cut-off")
        throttled = label.startswith("throttle")
        default = label == "throttle"
        steady_ok = steady / rate >= 0.98 and steady / rate <= 1.0 if default else None
        return [
            Figure(
                part,
                f"{label}: steady rate / limit (10%-90%; {done})",
                f"{steady / rate:.3f}",
                ">= 0.98, <= 1.0" if default else ("" if throttled else "reference"),
                steady_ok,
                raw={"steady_per_s": steady, "ran": len(starts)},
            ),
            Figure(
                part,
                f"{label}: most in any 1 s window / limit",
                f"{top / rate:.2f}",
                "<= 1.0" if throttled else "reference",
                top <= rate if throttled else None,
            ),
        ]


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
        ("1g overhead", lambda: bench.overhead(sizes["overhead_n"], args.rounds, pool)),
        ("2g binding limit", lambda: bench.binding(sizes["burst_n"], pool, nodes="G")),
    ]
    for title, step in steps:
        console.print(f"{time.monotonic() - began:5.0f}s  {title} ({pool}) ...", highlight=False)
        with cpu_use(ours, redis_pid) as used:
            figures += step()
        cpu[title.split()[0]] = used
    return figures


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


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
    parser.add_argument("--green", type=int, default=GREEN_CONCURRENCY, metavar="C",
                        help="concurrency of the gevent nodes (0: skip them)")
    args = parser.parse_args(argv)
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
                ("1 overhead", lambda: bench.overhead(sizes["overhead_n"], args.rounds)),
                ("2 binding limit", lambda: bench.binding(sizes["burst_n"])),
                ("4 rate vs Celery rate_limit", lambda: bench.rates(sizes["rate_n"], args.rate)),
                ("3 memory", lambda: bench.memory(sizes["hold_n"])),
            ]
            redis_pid = local_redis_pid(bench.gate)
            ours = [os.getpid()] + [pid for node in nodes for pid in (node.pid, *node.children)]
            for title, step in steps:
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
        "Part 1 runs both contenders on node T0 (the throttle app, so the same settings; "
        "its FireDueTimers bootstep is idle without ETA tasks). Part 4's Celery rows run on "
        "the plain app: "
        + ", ".join(f"{k}={v}" for k, v in SAFE_DEFAULTS.items() if "accept" not in k)
        + f"; no Throttle, no FireDueTimers bootstep (settings that differ from the throttle "
        f"app's: {bench.settings_differ or 'none'}).",
        "Throttle rows use the default slot_margin (40 ms): delayed calls are spaced window + "
        f"margin apart, so a 1 s window sustains at most 1/1.04 = {1 / 1.04:.3f} of the limit; "
        "the slot_margin 0ms row shows the limit without that cost.",
        "Part 2 queues the whole burst before the nodes consume it; its makespan target is "
        f"1 + slot_margin/window + 1% = {1 + MARGIN_S + 0.01:.2f} (the brief sets none). "
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
