"""The Laplace-backend benchmark runs (smoke mode) and compares equal posteriors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "laplace",
    reason="laplace-torch is needed for the Laplace benchmark "
    "(pip install --no-deps -r tests/compare-requirements.txt)",
)

ROOT = Path(__file__).resolve().parent.parent


def test_laplace_benchmark_smoke(tmp_path):
    out = tmp_path / "laplace.json"
    subprocess.run(
        [sys.executable, "benchmarks/laplace_fit.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    records = json.loads(out.read_text())["records"]
    assert {(r["likelihood"], r["C"], r["structure"]) for r in records} == {
        (likelihood, C, structure)
        for likelihood, C in [
            ("classification", 5),
            ("regression", 5),
            ("regression", 1),
        ]
        for structure in ("full", "diag")
    }
    for r in records:
        assert r["max_rel_difference"] < 1e-5  # float32: equal up to rounding
        assert r["ours_s"] > 0 and r["laplace_torch_s"] > 0
