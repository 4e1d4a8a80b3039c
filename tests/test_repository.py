"""The repository's promises: the README's commands and the runnable examples."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_commands = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("python3 -m venv")
    ]
    assert len(ci_commands) == 1
    assert ci_commands[0] in (ROOT / "README.md").read_text()
    assert "pytest" in ci_commands[0]


@pytest.mark.parametrize(
    "example, expected",
    [
        ("quickstart.py", ["top-5 eigenvalues", "mc_samples =  256"]),
        (
            "functional_laplace.py",
            ["predictive std:", "GGN estimated from one batch of 32"],
        ),
    ],
)
def test_example_runs(example: str, expected: list[str]):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / example)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout
