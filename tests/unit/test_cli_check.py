"""`throttle check PATH`: exit 1 and the error for a bad config; exit 0 naming each tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "config" / "tools.toml"
TOOLS = ["search_products", "get_inventory", "lookup_order", "process_refund"]

def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "throttle.cli", "check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_of_a_good_file_exits_0_and_names_every_tool() -> None:
    done = check(str(DEFAULT_CONFIG))
    assert done.returncode == 0, done.stderr
    for tool in TOOLS:
        assert tool in done.stdout


def test_check_without_a_path_reads_the_default_file() -> None:
    done = check()
    assert done.returncode == 0, done.stderr
    for tool in TOOLS:
        assert tool in done.stdout


def test_check_of_a_bad_file_exits_1_and_prints_the_error(tmp_path: Path) -> None:
    path = tmp_path / "tools.toml"
    path.write_text('[tools.search]\nlimits = ["100/60x"]\nmax_delay = "30s"\n', encoding="utf-8")
    done = check(str(path))
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "unknown unit" in output
    assert "search" in output
    # A console may wrap long lines: compare without whitespace.
    assert "".join(str(path).split()) in "".join(output.split())
    assert "Traceback" not in output


def test_check_of_a_missing_file_exits_1_without_a_traceback(tmp_path: Path) -> None:
    done = check(str(tmp_path / "absent.toml"))
    assert done.returncode == 1
    assert "file not found" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_check_lists_a_daily_quota_with_its_time_zone(tmp_path: Path) -> None:
    path = tmp_path / "tools.toml"
    path.write_text('[tools.q]\nlimits = ["10/1s", "500/1d"]\nmax_delay = "5s"\n'
                    'quota_tz = "Asia/Tokyo"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "throttle.cli", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "10/1s, 500/1d (Asia/Tokyo)" in done.stdout


def test_check_lists_a_pools_daily_quota_with_its_time_zone(tmp_path: Path) -> None:
    path = tmp_path / "tools.toml"
    path.write_text('[pools.llm]\nlimits = ["100/1m", "9000/1d"]\nshares = { high = 1.0 }\n'
                    'quota_tz = "Asia/Tokyo"\n[tools.q]\nlimits = ["10/1s"]\nmax_delay = "5s"\n'
                    'pool = "llm"\npriority = "high"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "throttle.cli", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "pool llm: 100/1m, 9000/1d (Asia/Tokyo); shares high 1" in done.stdout
