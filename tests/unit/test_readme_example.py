"""The README's "Testing your tools" example is the test module that runs it, word for word."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START, END = "# --- README: Testing your tools ---\n", "# --- end of the README example ---"


def test_the_readme_testing_example_is_the_test_that_runs_it() -> None:
    source = (ROOT / "tests/integration/test_readme_kit.py").read_text()
    example = source.split(START, 1)[1].split(END, 1)[0].strip()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{example}\n```" in readme
