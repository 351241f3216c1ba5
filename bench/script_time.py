"""What acquire.lua costs the Redis server, per path, and what a held call costs in bytes.

What it measures
    1. Server time per decision, per path of acquire.lua, read from the server's own
       counters (`INFO commandstats` before and after a batch of calls: `cmdstat_evalsha` and
       `cmdstat_fcall` usec / calls), so the client and the network are left out. The inner
       commands the script ran are counted the same way (Redis counts a `redis.call` under its
       own command), which gives the profile: calls and µs of each command per decision, and the
       Lua work left over (the script's time less its commands').
       Paths: `admit` (a new call, a limit that never binds), `admit+receipt` (the same with
       the worker's receipt), `reserve` (every call after the first 10 takes a future slot),
       `due` (a reserved call back at its slot, admitted by its reservation: pinned clock),
       `pooled` (a tool in a pool with a concurrency cap), `quota` (a daily quota beside the
       limit), `weighted` (calls of 100-149 units under a limit that never binds: the window
       grows to `--n` weighted entries) and, where the script has fair sharing, `fair`.
    2. Bytes per held (reserved) call: `MEMORY USAGE` of every key of a tool holding
       `--n` reservations, over `--n`, with the log and reservation set apart.
    3. Decisions per second seen by one client, in slices that alternate (bench.interleaved):
       a trivial EVALSHA, `limits`' moving window and the Gate admit-heavy, delay-heavy and
       pool + concurrency rows (as in bench.gate), the Gate rows once per script.

    With `--baseline PATH` (another acquire.lua, e.g. main's:
    `git show main:throttle/lua/acquire.lua > /tmp/acquire-main.lua`) every part runs both
    scripts, alternating round by round in the same process, and prints them side by side.
    Figures are medians over `--rounds`, with their range.

Run it on a Redis of your own: other clients' EVALSHA calls would count in part 1. Keys live
under a fresh `bench-<random>` prefix and are deleted at the end; nothing is flushed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from bench.gate_contenders import delete_prefix
from bench.interleaved import Contender, run_interleaved, timed_sync
from throttle import Gate, load_config
from throttle.config import Config
from throttle.scripts import Lane, LuaScript, evalsha, load_library

DEFAULT_URL = "redis://127.0.0.1:6379/0"
RESERVE_LIMIT = "10/1s"
SCRIPT_CALLS = ("evalsha", "fcall")  # (the package's script runs as a function library)
FAIR_TOOL = "fair"


class SourceScript(LuaScript):
    """A Lua script given by its source (the baseline read from a file)."""

    def __init__(self, source: str) -> None:  # (LuaScript loads by name from the package)
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self.function, self.library = None, ""  # (EVALSHA)


def bench_config(fair: bool) -> Config:
    tools: dict[str, Any] = {
        "admit": {"limits": ["10000000/10m"], "max_delay": "10m"},
        "reserve": {"limits": [RESERVE_LIMIT], "max_delay": "59m"},
        "due": {"limits": [RESERVE_LIMIT], "max_delay": "59m"},
        "pooled": {"limits": ["10000000/10m"], "max_delay": "10m", "pool": "bench_pool",
                   "priority": "standard", "concurrency": 100_000, "lease_timeout": "10m"},
        # (leases outlast any batch, even one slowed down 50x by bench.script_instructions)
        "quota": {"limits": ["10000000/10m", "10000000/1d"], "max_delay": "10m"},
        "delay_heavy": {"limits": [RESERVE_LIMIT], "max_delay": "59m"},
        "weighted": {"limits": ["1000000000/1m"], "max_delay": "10m"},
    }
    if fair:
        tools[FAIR_TOOL] = {"limits": ["10000000/10m"], "max_delay": "10m", "fair_by": "tenant",
                            "params": {"type": "object", "required": ["tenant"],
                                       "properties": {"tenant": {"type": "string"}}}}
    return load_config({
        "broker": {"visibility_timeout": "2h"},
        "pools": {"bench_pool": {"limits": ["10000000/10m"],
                                 "shares": {"critical": 1.0, "standard": 0.5}}},
        "tools": tools,
    })


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Command -> (calls, usec) from the server's counters."""
    out: dict[str, tuple[int, int]] = {}
    for name, value in client.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = (int(value["calls"]), int(value["usec"]))
    return out


@dataclass
class PathRun:
    """One batch of one path on one script: server µs per decision and its profile."""

    usec: float
    commands: dict[str, tuple[float, float]]  # command -> (calls, µs) per decision
    reasons: Counter[str] = field(default_factory=Counter)


class ScriptBench:
    """Runs acquire.lua's paths through `Gate`'s own argument building, per script."""

    def __init__(self, url: str, n: int, scripts: dict[str, LuaScript]) -> None:
        self.url, self.n, self.scripts = url, n, scripts
        self.prefix = f"bench-{uuid.uuid4().hex[:12]}"
        self.client = redis.Redis.from_url(url)
        self.lane = Lane(self.client)
        self.fair = all("== 'fair'" in s.source for s in scripts.values())
        self.config = bench_config(self.fair)
        self.gate = Gate(self.client, self.config, prefix=self.prefix)
        for script in scripts.values():  # (a NOSCRIPT answer would count as a call)
            self.client.script_load(script.source)
            if script.function is not None:
                load_library(self.client, script)

    def acquire(self, script: LuaScript, tool: str, member: str, now_s: float | None = None,
                receipt: str | None = None, key: Any = None, cost: float = 1) -> list[Any]:
        keys, args = self.gate._acquire_call(tool, member, key, cost, None, now_s, receipt)
        answer: list[Any] = evalsha(self.lane, script, keys, args)
        return answer

    def server_now_s(self) -> float:
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def paths(self) -> dict[str, Callable[[LuaScript], Callable[[], list[list[Any]]]]]:
        """Path -> setup(script) -> the timed batch (returns the answers)."""
        n = self.n

        def admit(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.acquire(script, "admit", m) for m in ids]

        def admit_receipt(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.acquire(script, "admit", m, receipt=f"{m}|1") for m in ids]

        def reserve(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.acquire(script, "reserve", m) for m in ids]

        def due(script: LuaScript) -> Callable[[], list[list[Any]]]:
            now = self.server_now_s()
            slots = []
            for _ in range(n):
                member = uuid.uuid4().hex
                answer = self.acquire(script, "due", member, now_s=now)
                slots.append((member, float(answer[2]) / 1000))
            return lambda: [self.acquire(script, "due", m, now_s=s) for m, s in slots]

        def pooled(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.acquire(script, "pooled", m) for m in ids]

        def quota(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.acquire(script, "quota", m) for m in ids]

        def weighted(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.acquire(script, "weighted", m, cost=100 + i % 50)
                            for i, m in enumerate(ids)]

        def fair(script: LuaScript) -> Callable[[], list[list[Any]]]:
            ids = [uuid.uuid4().hex for _ in range(n)]
            return lambda: [self.fair_acquire(script, m, i) for i, m in enumerate(ids)]

        paths = {"admit": admit, "admit+receipt": admit_receipt, "reserve": reserve,
                 "due": due, "pooled": pooled, "quota": quota, "weighted": weighted}
        if self.fair:
            paths["fair"] = fair
        return paths

    def fair_acquire(self, script: LuaScript, member: str, i: int) -> list[Any]:
        keys, args = self.gate._acquire_call(FAIR_TOOL, member, None, 1, None, None, None,
                                             fair_key=f"t{i % 8}")
        answer: list[Any] = evalsha(self.lane, script, keys, args)
        return answer

    def run_path(self, script: LuaScript, setup: Callable[[LuaScript],
                 Callable[[], list[list[Any]]]]) -> PathRun:
        delete_prefix(self.client, self.prefix)
        batch = setup(script)
        before = commandstats(self.client)
        answers = batch()
        after = commandstats(self.client)
        calls, usec = (sum(after.get(cmd, (0, 0))[i] - before.get(cmd, (0, 0))[i]
                           for cmd in SCRIPT_CALLS) for i in (0, 1))
        if calls != len(answers):
            raise RuntimeError(f"{calls} script calls counted for {len(answers)} calls: another "
                               "client uses this Redis; run the bench on a Redis of your own")
        commands = {}
        for name, (c, u) in after.items():
            c0, u0 = before.get(name, (0, 0))
            if name not in (*SCRIPT_CALLS, "info") and c > c0:
                commands[name] = ((c - c0) / calls, (u - u0) / calls)
        reasons = Counter(_text(a[0]) + " " + _text(a[3]) for a in answers)
        return PathRun(usec / calls, commands, reasons)

    def held_bytes(self, script: LuaScript) -> dict[str, float]:
        """Bytes per reserved call, by key kind, after `n` reservations (pinned clock)."""
        delete_prefix(self.client, self.prefix)
        now = self.server_now_s()
        held = 0
        for _ in range(self.n):
            answer = self.acquire(script, "reserve", uuid.uuid4().hex, now_s=now)
            held += _text(answer[0]) == "delay"
        out: dict[str, float] = {}
        for key in self.client.scan_iter(match=f"{self.prefix}*"):
            kind = key.decode().rsplit(":", 1)[-1]
            out[kind] = out.get(kind, 0) + int(self.client.memory_usage(key, samples=0) or 0)
        per_call = {kind: size / max(1, held) for kind, size in out.items()}
        per_call["total"] = sum(out.values()) / max(1, held)
        return per_call

    def close(self) -> None:
        delete_prefix(self.client, self.prefix)
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _median_range(values: Sequence[float], digits: int = 1) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def server_time(bench: ScriptBench, rounds: int, out: dict[str, Any]) -> None:
    names = list(bench.scripts)
    print(f"\n1. server time of acquire.lua per decision (µs, median and range of {rounds} "
          f"rounds of {bench.n} calls; INFO commandstats)")
    header = f"{'path':<15}" + "".join(f"{name:>24}" for name in names)
    print(header + ("      ratio" if len(names) == 2 else "") + "   answers")
    profiles: dict[str, dict[str, list[PathRun]]] = {}
    for path, setup in bench.paths().items():
        runs: dict[str, list[PathRun]] = {name: [] for name in names}
        for round_no in range(rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                runs[name].append(bench.run_path(bench.scripts[name], setup))
        medians = {name: statistics.median(r.usec for r in runs[name]) for name in names}
        line = f"{path:<15}" + "".join(
            f"{_median_range([r.usec for r in runs[name]]):>24}" for name in names)
        if len(names) == 2:
            line += f"{medians[names[1]] / medians[names[0]]:>10.2f}x"
        answers = runs[names[-1]][0].reasons
        line += "   " + ", ".join(f"{k} {v}" for k, v in answers.most_common(3))
        print(line)
        if len(names) == 2 and runs[names[0]][0].reasons != runs[names[1]][0].reasons:
            print(f"{'':15}answers differ: {names[0]} {dict(runs[names[0]][0].reasons)}")
        profiles[path] = runs
        out.setdefault("server_us", {})[path] = {
            name: {"median": medians[name], "runs": [r.usec for r in runs[name]],
                   "answers": dict(runs[name][0].reasons)} for name in names}

    for name in names:
        print(f"\n   profile of {name}: redis.call's per decision, count x µs "
              "(median round); Lua = the script's time less its commands'")
        for path, runs in profiles.items():
            run = sorted(runs[name], key=lambda r: r.usec)[len(runs[name]) // 2]
            inner = sum(u for _, u in run.commands.values())
            parts = ", ".join(f"{cmd} {c:.2f}x{u / c:.1f}" for cmd, (c, u) in
                              sorted(run.commands.items(), key=lambda kv: -kv[1][1]))
            print(f"   {path:<15} total {run.usec:5.1f}  commands {inner:5.1f} "
                  f"({sum(c for c, _ in run.commands.values()):.1f} calls)  "
                  f"Lua {run.usec - inner:5.1f} | {parts}")
            out.setdefault("profile", {}).setdefault(name, {})[path] = {
                "usec": run.usec, "commands": run.commands}


def lua_costs(client: redis.Redis) -> dict[str, float]:
    """µs per operation of Lua work the script does, timed inside the server."""
    loop = 20_000
    bodies = {
        "empty loop": "local x = 0",
        "tonumber(ARGV)": "local x = tonumber(ARGV[1])",
        "string.format %.17g": "local x = string.format('%.17g', 1764894000123.456 + i)",
        "'(' .. number": "local x = '(' .. (1764894000123.456 + i)",
        "gmatch live text": "for m, w in string.gmatch('100 60000 5 1000', '(%S+) (%S+)') "
                            "do local a = tonumber(m) end",
        "table {score, units}": "local t = {i, 1}",
        "redis.call TIME": "local t = redis.call('TIME')",
        "redis.call PTTL": "local t = redis.call('PTTL', KEYS[1])",
        "redis.call ZSCORE (miss)": "local t = redis.call('ZSCORE', KEYS[1], 'x')",
        "redis.call HLEN": "local t = redis.call('HLEN', KEYS[1])",
        "redis.call GET (miss)": "local t = redis.call('GET', KEYS[1])",
    }
    costs = {}
    for label, body in bodies.items():
        source = f"for i = 1, {loop} do {body} end return 1"
        best = float("inf")
        for _ in range(3):
            before = commandstats(client).get("eval", (0, 0))[1]
            client.eval(source, 1, "bench-lua-costs-missing-key", "12345.5")
            best = min(best, commandstats(client)["eval"][1] - before)
        costs[label] = best / loop
    empty = costs["empty loop"]
    return {label: max(0.0, cost - empty) if label != "empty loop" else cost
            for label, cost in costs.items()}


def held(bench: ScriptBench, rounds: int, out: dict[str, Any]) -> None:
    print(f"\n2. Redis bytes per held (reserved) call, {bench.n} reservations at "
          f"{RESERVE_LIMIT} (MEMORY USAGE)")
    for name, script in bench.scripts.items():
        sizes = bench.held_bytes(script)
        out.setdefault("held_bytes", {})[name] = sizes
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sizes.items() if k != "total")
        print(f"   {name:<12} {sizes['total']:.0f} B ({parts})")


def wall(bench: ScriptBench, n: int, rounds: int, out: dict[str, Any]) -> None:
    """Decisions/s of one client: references and the Gate rows once per script."""
    url, prefix = bench.url, bench.prefix
    contenders: list[Contender] = []
    plain = redis.Redis.from_url(url)
    trivial = plain.register_script("return 1")

    def call_trivial(member: str) -> Any:
        return trivial(keys=[f"{prefix}:trivial"], args=[member])

    contenders.append(Contender("evalsha", "trivial EVALSHA",
                                lambda ms: timed_sync(call_trivial, ms), lambda: None))
    storage = RedisStorage(url, key_prefix=f"{prefix}-limits")
    limiter = MovingWindowRateLimiter(storage)
    item, identity = parse("1000000/minute"), uuid.uuid4().hex
    contenders.append(Contender(
        "limits", "limits moving window",
        lambda ms: timed_sync(lambda m: limiter.hit(item, "bench", identity), ms),
        lambda: storage.clear(item.key_for("bench", identity))))
    gates = []
    for name, script in bench.scripts.items():
        gate = Gate(url, bench.config, prefix=f"{prefix}-{name}")
        gate._acquire_script = script
        gates.append(gate)
        for tool, label in (("admit", "admit-heavy"), ("delay_heavy", "delay-heavy"),
                            ("pooled", "pool + concurrency")):
            def call(member: str, gate: Gate = gate, tool: str = tool) -> Any:
                return gate.acquire(tool, member)

            def reset(gate: Gate = gate) -> None:
                delete_prefix(bench.client, gate.prefix)

            contenders.append(Contender(f"{label} {name}", f"Gate {label} ({name})",
                                        lambda ms, call=call: timed_sync(call, ms), reset))
    print(f"\n3. decisions/s of one client, {rounds} interleaved rounds of {n} calls; "
          "ratios per round (median and range)")
    run_interleaved(contenders, n, rounds, lambda text: None)
    by_key = {c.key: c for c in contenders}

    def ratios(key: str, ref: str) -> list[float]:
        return [r / s for s, r in zip(by_key[key].seconds, by_key[ref].seconds, strict=True)]

    for c in contenders:
        rates = [n / s for s in c.seconds]
        line = f"   {c.label:<32} {statistics.median(rates):>8.0f}/s"
        row: dict[str, Any] = {"rates": rates, "answers": dict(c.actions)}
        if c.key not in ("evalsha", "limits"):
            vs_l, vs_e = ratios(c.key, "limits"), ratios(c.key, "evalsha")
            line += (f"  x limits {_median_range(vs_l, 2)}  x EVALSHA {_median_range(vs_e, 2)}"
                     f"  {dict(c.actions)}")
            row |= {"x_limits": vs_l, "x_evalsha": vs_e}
        print(line)
        out.setdefault("wall", {})[c.key] = row
    for name in bench.scripts:
        pooled = ratios(f"pool + concurrency {name}", f"admit-heavy {name}")
        print(f"   pool + concurrency / admit-heavy ({name}): {_median_range(pooled, 2)}")
        out["wall"][f"pooled_vs_admit {name}"] = pooled
    for gate in gates:
        gate.close()
    plain.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.script_time", description=__doc__
                                     and __doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, metavar="PATH",
                        help="another acquire.lua to run side by side (e.g. main's)")
    parser.add_argument("--n", type=int, default=2000, help="calls per batch (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (default 5)")
    parser.add_argument("--wall-n", type=int, default=5000,
                        help="calls per contender and round in part 3 (0: skip it)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    url = os.environ.get("THROTTLE_REDIS_URL") or DEFAULT_URL
    scripts: dict[str, LuaScript] = {}
    if args.baseline:
        scripts["baseline"] = SourceScript(args.baseline.read_text("utf-8"))
    scripts["this"] = LuaScript("acquire")
    bench = ScriptBench(url, args.n, scripts)
    out: dict[str, Any] = {"n": args.n, "rounds": args.rounds}
    try:
        costs = lua_costs(bench.client)
        out["lua_costs_us"] = costs
        print("0. Lua work inside the server, µs per operation (loop of 20,000, best of 3)")
        print("   " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
        server_time(bench, args.rounds, out)
        held(bench, args.rounds, out)
        if args.wall_n:
            wall(bench, args.wall_n, args.rounds, out)
    finally:
        bench.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
