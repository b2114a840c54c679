"""The README's quickstart stays true: CI runs exactly its test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = [line for line in ci.splitlines() if "pytest" in line and "install" in line]
    readme = (ROOT / "README.md").read_text()
    assert command in readme.splitlines(), f"README lacks the CI command {command!r}"


def test_readme_main_job_is_the_benchmark():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[bench]" && moe-ep bench' in readme
