"""Adaptive limits: 429s and utilization against an upstream whose real limit is hidden.

Starts `throttle stub-llm` on 127.0.0.1 with a hidden request limit of 60% of the
configured one (`--limit`/`--window`), reporting it in `--headers` format, and drives it
through the real gate (`THROTTLE_REDIS_URL`, a fresh prefix deleted after) from
`--threads` client threads: acquire, wait out a delay, POST, report the answer to the gate
(`Adapter.report`, as a worker does after a body) and, on a 429, cool the tool down as a
worker does. Three phases, each `--phase-windows` windows long:

  fixed      `adaptive` off: the configured limit is the guess; count the 429s
  adaptive   `adaptive` on, same hidden limit: windows until at most one 429 per window
             (learning), then utilization = served / hidden limit per window
  raised     the hidden limit goes back to the configured one: windows until served
             reaches 0.9 of it again

A 429 pauses the tool as a worker does (the answer's retry hint, else 1 s) before its
answer is reported. The last line says which of the issue's targets were met.

The clients wait for slots, so calls come in bursts placed `window + slot margin` apart:
utilization is at most about `slot_margin_bound` = window / (window + margin), 0.98 with the
default margin on 1 s windows, 0.77 with `--slot-margin-ms 300` (its windows serving 0
calls are those no burst started in).

`--json PATH` saves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

from throttle import Action, Gate, load_config
from throttle.adaptive import AdaptiveState, Answer
from throttle.upstream_headers import read_limits
from workers.tools.llm_http import DEFAULT_PAUSE_S
from workers.tools.retry_hints import pause_s

BODY = {"model": "stub-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def start_stub(folder: Path, hidden: int, window_s: float, headers: str) -> tuple[Any, str]:
    log = folder / "stub.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "throttle.cli", "stub-llm", "--port", "0", "--hidden-requests",
         str(hidden), "--hidden-window", str(window_s), "--limit-headers", headers],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "listening on http://" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"stub did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, log.read_text().split("listening on ", 1)[1].split()[0]


def drive(gate: Gate, url: str, threads: int, seconds: float,
          trace: list[dict[str, Any]] | None = None,
          jitter_s: float = 0.0) -> list[tuple[float, int]]:
    """(answer time, status) of every call made by `threads` clients for `seconds`; with
    `trace`, also what each answer reported and what the gate set after it. `jitter_s`:
    each call waits up to this long (uniformly) between its admission and its request, as
    on a loaded worker."""
    answers: list[tuple[float, int]] = []
    lock = threading.Lock()
    end = time.time() + seconds
    jitter = random.Random(7)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while time.time() < end:
                member = uuid.uuid4().hex
                decision = gate.acquire("api", member)
                while decision.action is Action.DELAY:
                    time.sleep(decision.wait_s)
                    decision = gate.acquire("api", member)
                if decision.action is Action.FALLBACK:
                    continue
                admitted_s = time.time()
                if jitter_s:
                    with lock:
                        pause = jitter.uniform(0, jitter_s)
                    time.sleep(pause)
                response = http.post("chat/completions", json=BODY)
                if response.status_code == 429:  # as a worker does: pause, then report
                    asked_s = pause_s(response.headers)
                    gate.cool_down("api", DEFAULT_PAUSE_S if asked_s is None else asked_s,
                                   member=member)
                states = gate.adapter.report("api", [Answer(dict(response.headers),
                                                            response.status_code)],
                                             member=member)
                with lock:
                    answers.append((time.time(), response.status_code))
                    if trace is not None:
                        trace.append(_traced(response, states, admitted_s))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answers


def _traced(response: httpx.Response, states: list[AdaptiveState],
            admitted_s: float) -> dict[str, Any]:
    reading = read_limits(response.headers).requests
    return {"at_s": round(time.time(), 4), "admitted_s": round(admitted_s, 4),
            "status": response.status_code,
            "limit": reading.limit, "remaining": reading.remaining,
            "reset_s": reading.reset_s,
            "effective": states[0].effective if states else None,
            "reason": states[0].reason if states else None,
            "headers": {k: v for k, v in response.headers.items()
                        if "ratelimit" in k or "retry-after" in k}}


def per_window(answers: list[tuple[float, int]], start: float, window_s: float,
               count: int) -> list[Counter[int]]:
    windows: list[Counter[int]] = [Counter() for _ in range(count)]
    for at, status in answers:
        index = int((at - start) // window_s)
        if 0 <= index < count:
            windows[index][status] += 1
    return windows


def phase(url_redis: str, stub_url: str, adaptive: bool, args: argparse.Namespace,
          prefix: str, trace: list[dict[str, Any]] | None = None
          ) -> tuple[list[Counter[int]], Gate]:
    config = load_config({"tools": {"api": _tool(args, adaptive)}})
    gate = Gate(url_redis, config, prefix=prefix)
    start = time.time()
    if trace is not None:
        trace.append({"phase": "adaptive", "at_s": start})
    answers = drive(gate, stub_url, args.threads, args.phase_windows * args.window, trace,
                    args.jitter_ms / 1000)
    return per_window(answers, start, args.window, args.phase_windows), gate


def _tool(args: argparse.Namespace, adaptive: bool) -> dict[str, Any]:
    tool: dict[str, Any] = {"limits": [f"{args.limit}/{int(args.window * 1000)}ms"],
                            "max_delay": "10s", "adaptive": adaptive}
    if args.slot_margin_ms is not None:
        tool["slot_margin"] = f"{args.slot_margin_ms}ms"
    return tool


def verdict(figures: dict[str, Any]) -> dict[str, str]:
    """Each target of the issue, 'pass' or 'FAIL' with the figure. With headers: learned
    within 2 windows, then at most one 429 per window and utilization >= 0.9; recovered
    within 3 windows. Without (429s only): the same with utilization >= 0.85, recovery
    within 4 windows."""
    headers = figures["headers"] != "none"
    learned, used = figures["learned_after_windows"], figures["utilization_after_learning"]
    recovered = figures["recovered_after_windows"]
    want_use, want_recovery = (0.9, 3) if headers else (0.85, 4)
    checks = {"learned <= 2 windows": learned is not None and learned <= 2,
              f"utilization >= {want_use}": used is not None and used >= want_use,
              f"recovered <= {want_recovery} windows": (recovered is not None
                                                        and recovered <= want_recovery)}
    return {name: "pass" if ok else "FAIL" for name, ok in checks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="configured requests per window")
    parser.add_argument("--window", type=float, default=1.0, help="window (s)")
    parser.add_argument("--headers", default="openai", choices=["openai", "anthropic", "none"])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--phase-windows", type=int, default=12)
    parser.add_argument("--slot-margin-ms", type=int,
                        help="the tool's slot_margin (default: the config's default)")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="each call waits up to this long (uniformly, seeded) between "
                        "its admission and its request, as on a loaded worker")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trace", type=Path, help="JSON lines: each adaptive-phase answer's "
                        "reported limit, remaining and reset, and the effective limit after it")
    args = parser.parse_args()
    url = os.environ.get("THROTTLE_REDIS_URL", "redis://127.0.0.1:6379/0")
    hidden = int(args.limit * 0.6)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    figures: dict[str, Any] = {"limit": args.limit, "hidden": hidden, "window_s": args.window,
                               "headers": args.headers, "slot_margin_ms": args.slot_margin_ms,
                               "jitter_ms": args.jitter_ms}
    with tempfile.TemporaryDirectory() as folder:
        stub, stub_url = start_stub(Path(folder), hidden, args.window, args.headers)
        admin = httpx.Client(base_url=stub_url.removesuffix("/v1"), timeout=10)
        try:
            fixed, _ = phase(url, stub_url, False, args, prefix + "-fixed")
            busy = sum(w[429] for w in fixed)
            figures["fixed_429_per_minute"] = busy / (args.phase_windows * args.window) * 60
            figures["fixed_served_per_window"] = [w[200] for w in fixed]
            time.sleep(args.window * 2)  # the fixed phase's cooldowns and window pass
            trace: list[dict[str, Any]] = []
            adaptive, gate = phase(url, stub_url, True, args, prefix + "-adaptive", trace)
            learned = next((i for i in range(len(adaptive))
                            if all(w[429] <= 1 for w in adaptive[i:])), None)
            after = adaptive[(learned or 0) + 1:] if learned is not None else []
            figures["adaptive_429_per_window"] = [w[429] for w in adaptive]
            figures["adaptive_served_per_window"] = [w[200] for w in adaptive]
            figures["learned_after_windows"] = learned
            figures["utilization_after_learning"] = (
                sum(w[200] for w in after) / (len(after) * hidden) if after else None)
            admin.post("/_stub/config", json={"hidden_requests": args.limit}).raise_for_status()
            start = time.time()
            trace.append({"phase": "raised", "at_s": time.time()})
            answers = drive(gate, stub_url, args.threads, args.phase_windows * args.window,
                            trace, args.jitter_ms / 1000)
            raised = per_window(answers, start, args.window, args.phase_windows)
            figures["raised_served_per_window"] = [w[200] for w in raised]
            figures["raised_429_per_window"] = [w[429] for w in raised]
            figures["recovered_after_windows"] = next(
                (i + 1 for i, w in enumerate(raised) if w[200] >= 0.9 * args.limit), None)
        finally:
            admin.close()
            stub.terminate()
            stub.wait(10)
            client = redis.Redis.from_url(url)
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
            client.close()
    margin_ms = load_config({"tools": {"api": _tool(args, False)}}).tools["api"].slot_margin_ms
    figures["slot_margin_bound"] = round(args.window / (args.window + margin_ms / 1000), 3)
    figures["verdict"] = verdict(figures)
    for name, value in figures.items():
        print(f"{name:32} {value}")
    if args.trace:
        args.trace.write_text("".join(json.dumps(line) + "\n" for line in trace))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
