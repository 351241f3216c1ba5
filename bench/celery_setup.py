"""One run of `bench.celery`: its worker nodes, its apps and tools, its Redis databases,
and what the bodies recorded."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from bench.apps import Node, build
from throttle.routing import SAFE_DEFAULTS

BURST_LIMIT, RATE = 100, 20
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: one list per priority step, q + sep + p
MARGIN_S = 0.040  # the default slot_margin, whose cost shows in the makespan and rates
MAKESPAN_TARGET = 1.03  # part 2's makespan / ideal (issue 15)


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def tools_config(rate: int, burst_margin_ms: float | None = None) -> dict[str, Any]:
    """The tools of a run; `burst_margin_ms` sets part 2's slot_margin (None: the default)."""
    rated = {"limits": [f"{rate}/1s"], "max_delay": "60s"}
    burst: dict[str, Any] = {"limits": [f"{BURST_LIMIT}/1s"], "max_delay": "60s"}
    if burst_margin_ms is not None:
        burst["slot_margin"] = f"{burst_margin_ms:g}ms"
    return {
        "broker": {"visibility_timeout": "1h"},
        "tools": {
            "noop": {"limits": ["1000000/1s"], "max_delay": "60s"},
            "burst": burst,
            "hold": {"limits": ["10/1s"], "max_delay": "50m"},
            "rated_one": rated,
            "rated_two": rated,
            "rated_nomargin": {**rated, "slot_margin": "0ms"},
        },
    }


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
            "BENCH_CONFIG": json.dumps(tools_config(args.rate, args.burst_margin)),
            "BENCH_RATE_LIMIT": f"{args.rate}/s",
        }
        self.app, _, self.tasks = build(self.env)
        _, _, defaults = build({**self.env, "BENCH_APP": "defaults"})
        self.tasks |= defaults  # sent by its own app: its routes and settings are Celery's
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
                    "plain.floor",
                    "tool.rated_one",
                    "tool.rated_two",
                    "tool.hold",
                ),
                node("T1", "throttle", "tool.rated_two"),
                node("T2", "throttle", "tool.rated_nomargin"),
                node("D0", "defaults", "defaults.noop"),
                node("P0", "plain", "plain.rated_one"),
                node("P1", "plain", "plain.rated_two"),
                node("P2", "plain", "plain.rated_two"),
            )
        }
        # The same roles on gevent: G0 as T0 for part 1, G0-G2 as T0-T2 for part 2.
        self.green_nodes = [
            Node(name, "throttle", queues, log_dir / f"{name}.log")
            for name, queues in (("G0", ("tool.noop", "plain.noop", "plain.floor")),
                                 ("G1", ("bench.idle",)), ("G2", ("bench.idle",)))
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
        """What the bodies of run `run` recorded: start (Redis TIME), delays, eta, admission,
        and when the pool process began the call (`prerun`, the worker's clock)."""
        out = []
        for raw in self.gate.lrange(f"{self.prefix}:rec:{run}", 0, -1):
            at, _, rest = raw.decode().partition(" ")
            delays, eta, admitted, host, prerun = json.loads(rest)
            eta_s = dt.datetime.fromisoformat(eta).timestamp() if eta else None
            out.append(
                {
                    "at": float(at),
                    "delays": delays,
                    "eta": eta_s,
                    "admitted": admitted,
                    "host": host,
                    "prerun": prerun,
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
