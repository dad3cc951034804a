"""The documents keep their promises: README opens with the two commands a newcomer
types (run pgbeat with its runtime dependencies only; run the tests), CI runs the
second exactly as written, and SOLUTION.md stays a design document a reviewer reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    first_block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert first_block, "README.md has no sh block"
    return first_block.group(1).splitlines()


def test_readme_opens_with_the_command_that_runs_pgbeat_and_the_one_that_tests_it():
    run, test = readme_commands()
    assert "pip install -e . " in run and "[dev]" not in run and run.endswith("pgbeat serve")
    assert "pip install -e '.[dev]'" in test and test.endswith("just test")


def test_ci_runs_the_readme_test_command_as_written():
    _, test = readme_commands()
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_solution_stays_within_25_kb():
    assert len((ROOT / "SOLUTION.md").read_bytes()) <= 25 * 1024
