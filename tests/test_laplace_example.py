"""The Laplace gallery example runs (smoke mode) and both backends agree."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "laplace",
    reason="laplace-torch is needed for the Laplace example "
    "(pip install --no-deps -r tests/compare-requirements.txt)",
)

ROOT = Path(__file__).resolve().parent.parent


def test_laplace_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "docs" / "examples" / "laplace_backend.py"),
            "--smoke",
            "--out",
            str(tmp_path / "laplace_backend.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "CurvlinopsFisherGGN: fit" in result.stdout
    assert "CurvlinopsGGN: fit" in result.stdout
    difference = re.search(r"predictive std: (\S+)", result.stdout).group(1)
    assert float(difference) < 1e-2  # float32 fits, prior tuned on each
