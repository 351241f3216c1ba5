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

`--json PATH` saves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
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
from throttle.adaptive import Answer

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


def drive(gate: Gate, url: str, threads: int, seconds: float) -> list[tuple[float, int]]:
    """(answer time, status) of every call made by `threads` clients for `seconds`."""
    answers: list[tuple[float, int]] = []
    lock = threading.Lock()
    end = time.time() + seconds

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
                response = http.post("chat/completions", json=BODY)
                gate.adapter.report("api", [Answer(dict(response.headers),
                                                   response.status_code)])
                if response.status_code == 429:
                    pause_s = float(response.headers.get("retry-after-ms", 1000)) / 1000
                    gate.cool_down("api", max(pause_s, 0.001), member=member)
                with lock:
                    answers.append((time.time(), response.status_code))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answers


def per_window(answers: list[tuple[float, int]], start: float, window_s: float,
               count: int) -> list[Counter[int]]:
    windows: list[Counter[int]] = [Counter() for _ in range(count)]
    for at, status in answers:
        index = int((at - start) // window_s)
        if 0 <= index < count:
            windows[index][status] += 1
    return windows


def phase(url_redis: str, stub_url: str, adaptive: bool, limit: int, window_s: float,
          threads: int, windows: int, prefix: str) -> tuple[list[Counter[int]], Gate]:
    config = load_config({"tools": {"api": {
        "limits": [f"{limit}/{int(window_s * 1000)}ms"], "max_delay": "10s",
        "adaptive": adaptive}}})
    gate = Gate(url_redis, config, prefix=prefix)
    start = time.time()
    answers = drive(gate, stub_url, threads, windows * window_s)
    return per_window(answers, start, window_s, windows), gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="configured requests per window")
    parser.add_argument("--window", type=float, default=1.0, help="window (s)")
    parser.add_argument("--headers", default="openai", choices=["openai", "anthropic", "none"])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--phase-windows", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    url = os.environ.get("THROTTLE_REDIS_URL", "redis://127.0.0.1:6379/0")
    hidden = int(args.limit * 0.6)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    figures: dict[str, Any] = {"limit": args.limit, "hidden": hidden, "window_s": args.window,
                               "headers": args.headers}
    with tempfile.TemporaryDirectory() as folder:
        stub, stub_url = start_stub(Path(folder), hidden, args.window, args.headers)
        admin = httpx.Client(base_url=stub_url.removesuffix("/v1"), timeout=10)
        try:
            fixed, _ = phase(url, stub_url, False, args.limit, args.window, args.threads,
                             args.phase_windows, prefix + "-fixed")
            busy = sum(w[429] for w in fixed)
            figures["fixed_429_per_minute"] = busy / (args.phase_windows * args.window) * 60
            figures["fixed_served_per_window"] = [w[200] for w in fixed]
            time.sleep(args.window * 2)  # the fixed phase's cooldowns and window pass
            adaptive, gate = phase(url, stub_url, True, args.limit, args.window, args.threads,
                                   args.phase_windows, prefix + "-adaptive")
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
            answers = drive(gate, stub_url, args.threads, args.phase_windows * args.window)
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
    for name, value in figures.items():
        print(f"{name:32} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
