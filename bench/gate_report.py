"""`bench.gate`'s table and targets: each row's rate and its ratios to the references."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.gate_contenders import IN_FLIGHT, PREFILL, Bench, delay_limit
from bench.interleaved import Contender
from throttle.store import mask_url

TARGET_VS_LIMITS = 1.0
TARGET_VS_EVALSHA = 0.85
TARGET_ROWS = ("gate_admit", "gate_delay")
# This row against that one, at least this ratio (each measured in the same run).
TARGETS_RELATIVE = (
    ("gate_pooled", "gate_admit", 0.8),  # a pool and a concurrency cap cost little
    ("async_gate_admit", "gate_admit", 3.0),  # 50 in flight share round trips
)


def _mix(contender: Contender) -> str:
    """The answers over the timed runs, e.g. "delay 59,970, admit 30"."""
    return ", ".join(f"{action} {count:,}" for action, count in contender.actions.most_common())


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def _round_ratios(row: dict[str, Any], reference: dict[str, Any]) -> str:
    """The rate ratio of `row` over `reference` in each interleaved round: "lo-hi"."""
    ratios = [ref / own for own, ref in zip(row["runs_s"], reference["runs_s"], strict=True)]
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}"


def report(bench: Bench, console: Console) -> dict[str, Any]:
    """Print the table and the targets line; return the numbers for --json."""
    n = bench.n
    by_key = {contender.key: contender for contender in bench.contenders}
    evalsha = by_key["evalsha"].best_rate(n)
    limits_rate = by_key["limits"].best_rate(n)

    table = Table(
        title=f"throttle gate: decisions/s, best of {bench.rounds} interleaved runs of "
        f"{n:,} calls, one client, {mask_url(bench.url)}; ratios are within this run"
    )
    table.add_column("contender")
    table.add_column("decisions/s", justify="right")
    table.add_column("µs/decision", justify="right")
    table.add_column("x EVALSHA", justify="right")
    table.add_column("x limits", justify="right")
    table.add_column("answers")
    table.add_column("spread", justify="right")

    rows: list[dict[str, Any]] = []
    for contender in bench.contenders:
        rate = contender.best_rate(n)
        row: dict[str, Any] = {
            "key": contender.key,
            "contender": contender.label,
            "decisions_per_s": rate,
            "us_per_decision": 1e6 / rate,
            "ratio_vs_evalsha": _ratio(rate, evalsha),
            "ratio_vs_limits": _ratio(rate, limits_rate),
            "runs_s": contender.seconds,
            "spread": contender.spread(),
            "actions": dict(contender.actions),
        }
        rows.append(row)
        table.add_row(
            contender.label,
            f"{rate:,.0f}",
            f"{1e6 / rate:.1f}",
            f"{row['ratio_vs_evalsha']:.2f}x",
            f"{row['ratio_vs_limits']:.2f}x",
            _mix(contender),
            f"{contender.spread():.1%}",
        )
    console.print(table)

    targets: list[dict[str, Any]] = []
    verdicts: list[str] = []
    for key in TARGET_ROWS:
        row = next(r for r in rows if r["key"] == key)
        checks: tuple[tuple[str, float, float], ...] = (
            ("limits", row["ratio_vs_limits"], TARGET_VS_LIMITS),
            ("evalsha", row["ratio_vs_evalsha"], TARGET_VS_EVALSHA),
        )
        for name, value, target in checks:
            ok = value >= target
            targets.append(
                {"contender": key, "versus": name, "ratio": value, "target": target, "pass": ok}
            )
            verdict = "[green]PASS[/green]" if ok else "[red]MISS[/red]"
            ref = "limits' moving window" if name == "limits" else "trivial EVALSHA"
            spread = _round_ratios(row, next(r for r in rows if r["key"] == name))
            verdicts.append(
                f"{row['contender']} {value:.2f}x {ref} ({spread}; >= {target:.2f}x) {verdict}"
            )
    for key, reference_key, target in TARGETS_RELATIVE:
        row = next(r for r in rows if r["key"] == key)
        reference = next(r for r in rows if r["key"] == reference_key)
        value = _ratio(row["decisions_per_s"], reference["decisions_per_s"])
        ok = value >= target
        targets.append(
            {"contender": key, "versus": reference_key, "ratio": value, "target": target,
             "pass": ok}
        )
        verdict = "[green]PASS[/green]" if ok else "[red]MISS[/red]"
        verdicts.append(
            f"{row['contender']} {value:.2f}x {reference['contender']} "
            f"({_round_ratios(row, reference)}; >= {target:.2f}x) {verdict}"
        )
    console.print(
        f"Targets: Gate >= {TARGET_VS_LIMITS:.1f}x limits' moving window and >= "
        f"{TARGET_VS_EVALSHA:.2f}x the trivial EVALSHA, admit-heavy and delay-heavy; a pool "
        "and a concurrency cap keep >= 0.8x of admit-heavy; "
        "AsyncGate with 50 in flight >= 3x the sync admit-heavy:"
    )
    for line in verdicts:
        console.print(f"  {line}")
    return {
        "n": n,
        "rounds": bench.rounds,
        "in_flight": IN_FLIGHT,
        "prefill": PREFILL,
        "redis_url": mask_url(bench.url),
        "delay_limit": delay_limit(n),
        "contenders": rows,
        "targets": targets,
        "all_pass": all(t["pass"] for t in targets),
    }
