"""`python -m workers.produce`: send the seed's e-commerce burst to the deployed workers.

The calls of `--sessions` assistant sessions go out through `.delay()` at their planned
times over `--duration` seconds, `--rounds` times; the workers of docker-compose.yml (or
any `celery -A workers worker`) run them, and Flower, `throttle status` and Grafana show
how the throttle smooths them. It does not wait for results.
"""

from __future__ import annotations

import time
from collections import Counter

import click

from workers.celery import seed_tools
from workers.scenario import plan_sessions


@click.command()
@click.option("--sessions", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--duration", "duration_s", default=60.0, show_default=True,
              type=click.FloatRange(min=1), help="Seconds each round's calls are spread over.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=7, show_default=True)
def produce(sessions: int, duration_s: float, rounds: int, seed: int) -> None:
    """Send `--rounds` bursts of the seed's scenario to the tools' queues."""
    tasks = seed_tools
    for round_number in range(rounds):
        plan = plan_sessions(sessions, duration_s, tasks, seed=seed + round_number)
        started = time.monotonic()
        sent: Counter[str] = Counter()
        for call in plan:
            wait_s = started + call.at_s - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)
            tasks[call.tool].delay(**call.kwargs)
            sent[call.tool] += 1
        summary = ", ".join(f"{tool} {count}" for tool, count in sorted(sent.items()))
        click.echo(f"round {round_number + 1}/{rounds}: sent {summary}")
        time.sleep(max(0.0, started + duration_s - time.monotonic()))


if __name__ == "__main__":
    produce()
