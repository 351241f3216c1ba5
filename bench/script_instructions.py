"""What acquire.lua costs the Redis server per decision, per path, in instructions.

Timings on a shared machine move by 2x within an hour; the instructions a server runs for
the same calls repeat to well under 1%, whatever else the machine does. So a change to
acquire.lua of a few percent shows here when `bench.script_time` cannot tell it from noise.

It starts its own `redis-server` under `valgrind --tool=callgrind` on a free loopback port
(`apt-get install valgrind`), runs `bench.script_time`'s paths through the gate's own
arguments, and reads the instructions of each batch of `--n` calls alone
(`callgrind_control --zero`, then `-e Ir`). The `trivial` row is a script of `return 1` sent
with the admit path's keys and arguments: what any EVALSHA of that size costs the server
(parsing, the Lua call, the reply), so a path's figure less it is the script's own work.
With `--baseline PATH` every path runs both scripts on the same server, side by side.
A batch starts on empty keys, so its logs pass Redis's `zset-max-listpack-entries` (128)
early on: up to there a sorted set is a listpack, whose every read and write walks it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.gate_contenders import delete_prefix
from bench.script_time import ScriptBench, SourceScript
from throttle.scripts import LuaScript

TRIVIAL = "return 1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CountedServer:
    """A redis-server under callgrind; `instructions()` counts since the last `zero()`."""

    def __init__(self, workdir: Path) -> None:
        for tool in ("valgrind", "callgrind_control", "redis-server"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} is not installed: apt-get install valgrind redis-server")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--toggle-collect=evalShaCommand",
             "--toggle-collect=fcallCommand",
             f"--callgrind-out-file={workdir}/callgrind.%p",
             "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("redis-server under valgrind did not start") from None
                time.sleep(0.2)
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _control(self, *args: str) -> str:
        return subprocess.run(["callgrind_control", *args, str(self.proc.pid)],
                              capture_output=True, text=True, check=True, timeout=60).stdout

    def zero(self) -> None:
        self._control("--zero")

    def instructions(self) -> int:
        """Instructions run by every thread of the server since the last `zero()`."""
        out = self._control("-e", "Ir")
        counts = re.findall(r"^\s*Th \d+\s+([\d,]+)", out, re.MULTILINE)
        if not counts:
            raise RuntimeError(f"callgrind_control printed no counts:\n{out}")
        return sum(int(count.replace(",", "")) for count in counts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def count_paths(bench: ScriptBench, server: CountedServer,
                paths: Sequence[str]) -> dict[str, dict[str, float]]:
    """Instructions per call, by path and script (and the trivial script on the admit path)."""
    setups = bench.paths()
    trivial = SourceScript(TRIVIAL)
    bench.client.script_load(TRIVIAL)
    runs: list[tuple[str, str, LuaScript]] = [("trivial", "trivial", trivial)]
    for path in paths:
        runs += [(path, name, script) for name, script in bench.scripts.items()]
    out: dict[str, dict[str, float]] = {}
    for path, name, script in runs:
        delete_prefix(bench.client, bench.prefix)
        batch = setups["admit" if path == "trivial" else path](script)
        server.zero()
        answers = batch()
        out.setdefault(path, {})[name] = server.instructions() / len(answers)
    return out


def report(counts: dict[str, dict[str, float]], names: Sequence[str]) -> None:
    base = counts["trivial"]["trivial"]
    print(f"\ninstructions of the Redis server per call (callgrind); trivial EVALSHA "
          f"{base:,.0f}; in brackets: less the trivial call")
    header = "".join(f"{name:>24}" for name in names)
    print(f"{'path':<16}{header}" + ("   this / baseline" if len(names) == 2 else ""))
    for path, by_name in counts.items():
        if path == "trivial":
            continue
        cells = "".join(f"{f'{by_name[n]:,.0f} ({by_name[n] - base:,.0f})':>24}" for n in names)
        ratio = (f"   {(by_name['this'] - base) / (by_name['baseline'] - base):.3f}x"
                 if len(names) == 2 else "")
        print(f"{path:<16}{cells}{ratio}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.script_instructions",
                                     description=__doc__ and __doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, metavar="PATH",
                        help="another acquire.lua to count side by side (e.g. main's)")
    parser.add_argument("--n", type=int, default=300, help="calls per batch (default 300)")
    parser.add_argument("--paths", default="admit,admit+receipt,reserve,due,pooled,quota,"
                        "weighted", help="comma-separated paths of bench.script_time")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    scripts: dict[str, LuaScript] = {}
    if args.baseline:
        scripts["baseline"] = SourceScript(args.baseline.read_text("utf-8"))
    scripts["this"] = LuaScript("acquire")
    with tempfile.TemporaryDirectory(prefix="script-instructions-") as workdir:
        server = CountedServer(Path(workdir))
        try:
            bench = ScriptBench(server.url, args.n, scripts)
            try:
                paths = [p for p in args.paths.split(",") if p]
                unknown = set(paths) - set(bench.paths())
                if unknown:
                    raise SystemExit(f"unknown paths {sorted(unknown)}; choose from "
                                     f"{sorted(bench.paths())}")
                counts = count_paths(bench, server, paths)
            finally:
                bench.close()
        finally:
            server.stop()
    report(counts, list(scripts))
    if args.json:
        out: dict[str, Any] = {"n": args.n, "instructions_per_call": counts}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
