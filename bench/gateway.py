"""The gateway's cost: requests/s and latency through `throttle gateway` vs the stub directly.

One run starts, on 127.0.0.1, `throttle stub-llm` (answers after `--stub-latency`), one
`celery -A workers worker -Q tool.chat_completion -P threads -c <concurrency>` and
`throttle gateway`, against a real Redis (`THROTTLE_REDIS_URL`, default
redis://127.0.0.1:6379/0): broker and results on database numbers `--dbs` (emptied before
and after), the gate on the URL's own database under a fresh prefix (its keys deleted
after). Limits never bind; `--count calls` makes the LLM tool's limits count calls instead
of tokens (no cost or settle: the gateway's own cost without a weighted window's). The same
`openai.AsyncOpenAI` client sends `--n` forced tool calls with `--concurrency` in flight to
each contender, alternated over `--rounds`:

  direct     the stub itself
  in-proc    `Gateway.complete()` in this process: publish, worker, result; no HTTP
  gateway    the gateway over HTTP: what a caller sees
  gw-direct  a second gateway in direct mode (`--direct workers.tools.llm_async:chat_completion`):
             it gates with `AsyncGate` and awaits the LLM body itself, no broker or worker

The best round of each counts. Then `--solo-n` requests go one at a time to each contender:
the latency the gateway adds without queueing (under load, queueing on the CPU dominates:
requests in flight / rate, Little's law). Added latency is the gateway's percentile minus the direct
one's. CPU ms per request are read from /proc for each process over the round (the client
is this process; `in-proc` publishes and waits in it too). `--json PATH` saves every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
import redis
import tomli_w
from rich.console import Console
from rich.table import Table

from throttle import load_config
from throttle.gateway.chat import read_call
from throttle.gateway.service import running
from throttle.gateway.settings import GatewaySettings
from throttle.store import mask_url

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "redis://127.0.0.1:6379/0"
SCHEMA = {"type": "object", "required": ["city", "days"],
          "properties": {"city": {"type": "string", "minLength": 2},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
REQUEST = {
    "model": "stub-1",
    "messages": [{"role": "user", "content": "What will the weather be in Lyon this week?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "max_tokens": 32,
}
START_TIMEOUT_S = 60
DIRECT_BODY = "workers.tools.llm_async:chat_completion"
TARGET_ADDED_P50_MS = 5.0  # one request at a time
TARGET_RATE_RATIO = 0.8  # at --concurrency in flight, vs the stub directly


@dataclass
class Run:
    contender: str
    round: int
    seconds: float
    latencies_s: list[float]
    errors: int
    cpu_ms: dict[str, float] | None = None  # CPU ms per request, by process

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.seconds

    def pct_ms(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (0 where /proc cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def empty(url: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def url_in(log: Path, proc: subprocess.Popen[bytes]) -> str:
    """The http://.../v1 a `throttle` server printed once it listens."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while "listening on http://" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{log.name}: did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return log.read_text().split("listening on ", 1)[1].split()[0]


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def drive(send: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> Run:
    """`n` calls of `send`, at most `concurrency` at once; each one's latency."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        async with gate:
            began = time.perf_counter()
            try:
                await send()
            except Exception as exc:
                errors += 1
                if errors == 1:
                    print(f"  first error: {exc!r}"[:300])
                return
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return Run("", 0, time.perf_counter() - began, latencies, errors)


async def timed(send: Callable[[], Awaitable[Any]], n: int, concurrency: int,
                pids: dict[str, int]) -> Run:
    """`drive`, with each process's CPU time per request over the run."""
    before = {process: cpu_s(pid) for process, pid in pids.items()}
    run = await drive(send, n, concurrency)
    run.cpu_ms = {process: (cpu_s(pid) - before[process]) * 1000 / n
                  for process, pid in pids.items()}
    return run


async def measure(args: argparse.Namespace, settings: GatewaySettings, stub_url: str,
                  gateway_url: str, direct_url: str, pids: dict[str, int]) -> list[Run]:
    direct = openai.AsyncOpenAI(base_url=stub_url, api_key="bench", max_retries=0, timeout=60)
    through = openai.AsyncOpenAI(base_url=gateway_url, api_key="bench", max_retries=0,
                                 timeout=120)
    short = openai.AsyncOpenAI(base_url=direct_url, api_key="bench", max_retries=0,
                               timeout=120)
    call = read_call(REQUEST, settings.config, settings.default_tool)
    runs: list[Run] = []
    async with running(settings) as gateway:
        contenders: dict[str, Callable[[], Awaitable[Any]]] = {
            "direct": lambda: direct.chat.completions.create(**REQUEST),
            "in-proc": lambda: gateway.complete(call),
            "gateway": lambda: through.chat.completions.create(**REQUEST),
            "gw-direct": lambda: short.chat.completions.create(**REQUEST),
        }
        for send in contenders.values():  # warm up every path (connections, worker threads)
            await drive(send, args.concurrency, args.concurrency)
        for number in range(args.rounds):
            order = list(contenders)
            order = order[number % len(order):] + order[: number % len(order)]
            for name in order:
                run = await timed(contenders[name], args.n, args.concurrency, pids)
                run.contender, run.round = name, number + 1
                print(f"  round {number + 1} {name:8} {run.rate:7.1f} req/s  p50 "
                      f"{run.pct_ms(50):6.1f} ms  p99 {run.pct_ms(99):6.1f} ms  errors "
                      f"{run.errors}")
                runs.append(run)
        for name, send in contenders.items():
            run = await timed(send, args.solo_n, 1, pids)
            run.contender, run.round = f"{name} x1", 0
            runs.append(run)
    for client in (direct, through, short):
        await client.close()
    return runs


def render(best: dict[str, Run], base: Run, title: str, console: Console) -> dict[str, Any]:
    table = Table(title=title)
    for column in ("contender", "req/s", "x direct", "p50 ms", "p99 ms", "max ms",
                   "added p50 ms", "added p99 ms", "errors", "CPU ms/req: client", "gateway",
                   "worker", "gw-direct", "stub"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    figures: dict[str, Any] = {}
    for name, run in best.items():
        added50, added99 = run.pct_ms(50) - base.pct_ms(50), run.pct_ms(99) - base.pct_ms(99)
        figures[name] = {"rate": run.rate, "ratio": run.rate / base.rate,
                         "p50_ms": run.pct_ms(50), "p99_ms": run.pct_ms(99),
                         "max_ms": run.pct_ms(100), "added_p50_ms": added50,
                         "added_p99_ms": added99, "errors": run.errors, "cpu_ms": run.cpu_ms}
        cpu = run.cpu_ms or {}
        table.add_row(name, f"{run.rate:.1f}", f"{run.rate / base.rate:.2f}",
                      f"{run.pct_ms(50):.1f}", f"{run.pct_ms(99):.1f}",
                      f"{run.pct_ms(100):.1f}", "" if run is base else f"{added50:+.1f}",
                      "" if run is base else f"{added99:+.1f}", str(run.errors),
                      *(f"{cpu.get(process, math.nan):.1f}"
                        for process in ("client", "gateway", "worker", "gw-direct", "stub")))
    console.print(table)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="requests per round and contender")
    parser.add_argument("--concurrency", type=int, default=20, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the best counts")
    parser.add_argument("--solo-n", type=int, default=50,
                        help="requests sent one at a time to each contender (default 50)")
    parser.add_argument("--publish-threads", type=int, default=8,
                        help="the gateway's --publish-threads (default 8)")
    parser.add_argument("--stub-latency", type=float, default=0.05,
                        help="seconds the stub takes per answer (default 0.05)")
    parser.add_argument("--redis-url", default=os.environ.get("THROTTLE_REDIS_URL", DEFAULT_URL))
    parser.add_argument("--dbs", type=int, nargs=2, default=(6, 7), metavar=("BROKER", "RESULTS"),
                        help="database numbers for the broker and results, emptied (default 6 7)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--count", choices=("tokens", "calls"), default="tokens",
                        help="what the LLM tool's limits count: tokens as configured (cost "
                        "and settle, a weighted window), or calls (cost 1, no settle: the "
                        "gateway's own cost without the weighted window's); default tokens")
    args = parser.parse_args(argv)
    if 0 in args.dbs or len(set(args.dbs)) != 2:
        raise SystemExit("--dbs: two different database numbers other than 0 (they are emptied)")
    console = Console(width=140) if not Console().is_terminal else Console()
    broker, results = (with_db(args.redis_url, db) for db in args.dbs)
    prefix = f"bench-gateway-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        folder = Path(tmp)
        document = tomllib.loads((ROOT / "config" / "tools.toml").read_text(encoding="utf-8"))
        document["pools"]["llm_tokens"]["limits"] = ["1000000000/60s"]
        document["tools"]["chat_completion"]["limits"] = ["1000000000/60s"]
        if args.count == "calls":
            for field in ("cost", "settle"):
                document["tools"]["chat_completion"].pop(field, None)
        config_path = folder / "tools.toml"
        config_path.write_text(tomli_w.dumps(document), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "THROTTLE_CONFIG": str(config_path),
               "THROTTLE_REDIS_URL": args.redis_url, "THROTTLE_BROKER_URL": broker,
               "THROTTLE_RESULT_BACKEND": results, "THROTTLE_PREFIX": prefix,
               "THROTTLE_TASK_EVENTS": "0", "THROTTLE_LLM_API_KEY": "bench-key",
               "THROTTLE_LLM_MODEL": "stub-1"}
        for url in (broker, results):
            empty(url)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            stub = start([sys.executable, "-m", "throttle.cli", "stub-llm", "--port", "0",
                          "--latency", str(args.stub_latency)], folder / "stub.log", env)
            procs.append(stub)
            env["THROTTLE_LLM_BASE_URL"] = stub_url = url_in(folder / "stub.log", stub)
            worker = start([sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q",
                            "tool.chat_completion", "-P", "threads", "-c",
                            str(args.concurrency), "-l", "WARNING", "--without-gossip",
                            "--without-mingle", "--without-heartbeat"],
                           folder / "worker.log", env)
            procs.append(worker)
            gateway = start([sys.executable, "-m", "throttle.cli", "gateway", "--port", "0",
                             "--no-access-log", "--log-level", "warning",
                             "--publish-threads", str(args.publish_threads)],
                            folder / "gateway.log", env)
            procs.append(gateway)
            gateway_url = url_in(folder / "gateway.log", gateway)
            short = start([sys.executable, "-m", "throttle.cli", "gateway", "--port", "0",
                           "--no-access-log", "--log-level", "warning", "--direct", DIRECT_BODY],
                          folder / "direct.log", env)
            procs.append(short)
            direct_url = url_in(folder / "direct.log", short)
            settings = GatewaySettings(config=load_config(config_path),
                                       redis_url=args.redis_url, broker_url=broker,
                                       result_backend=results, prefix=prefix,
                                       publish_threads=args.publish_threads)
            console.print(f"stub, worker and gateway up after {time.monotonic() - began:.1f}s; "
                          f"Redis {mask_url(args.redis_url)}, dbs {args.dbs}", highlight=False)
            pids = {"client": os.getpid(), "gateway": gateway.pid, "worker": worker.pid,
                    "gw-direct": short.pid, "stub": stub.pid}
            runs = asyncio.run(measure(args, settings, stub_url, gateway_url, direct_url, pids))
        finally:
            stop(procs)
            for url in (broker, results):
                empty(url)
            gate = redis.Redis.from_url(args.redis_url)
            for key in list(gate.scan_iter(match=f"{prefix}:*", count=1000)):
                gate.delete(key)
            gate.close()
    names = ("direct", "in-proc", "gateway", "gw-direct")
    best = {name: max((r for r in runs if r.contender == name), key=lambda r: r.rate)
            for name in names}
    solo = {f"{name} x1": next(r for r in runs if r.contender == f"{name} x1") for name in names}
    figures = render(best, best["direct"], f"throttle gateway (python -m bench.gateway): "
                     f"{args.n} requests, {args.concurrency} in flight, stub latency "
                     f"{args.stub_latency:g}s, {args.publish_threads} publish threads, limits "
                     f"count {args.count}, best of {args.rounds}", console)
    figures.update(render(solo, solo["direct x1"], f"one at a time: {args.solo_n} requests "
                          "each", console))
    verdicts = check(figures)
    for line in verdicts:
        console.print(line, highlight=False)
    load = os.getloadavg()
    console.print(f"  {os.cpu_count()} CPUs, load average {load[0]:.2f} at the end; total "
                  f"{time.monotonic() - began:.0f}s. Worker: threads pool, -c {args.concurrency}; "
                  "gateway: one uvicorn process, no access log.", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "best": figures, "targets": verdicts,
                                         "runs": [asdict(r) for r in runs]}, indent=1))
    return 1 if args.check and any(line.endswith("MISS") for line in verdicts) else 0


def check(figures: dict[str, Any]) -> list[str]:
    """One PASS/MISS line per target and gateway mode."""
    lines = []
    for mode in ("gateway", "gw-direct"):
        added = figures[f"{mode} x1"]["added_p50_ms"]
        ratio = figures[mode]["ratio"]
        verdict = "PASS" if added <= TARGET_ADDED_P50_MS else "MISS"
        lines.append(f"  {mode}: added p50 one at a time {added:+.1f} ms (<= "
                     f"+{TARGET_ADDED_P50_MS:g}) {verdict}")
        lines.append(f"  {mode}: throughput vs direct {ratio:.2f}x (>= {TARGET_RATE_RATIO:g}x) "
                     f"{'PASS' if ratio >= TARGET_RATE_RATIO else 'MISS'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
