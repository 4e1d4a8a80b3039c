"""The exact-structure benchmark runs (smoke mode) and measures correct computations."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_structure_benchmark_smoke(tmp_path):
    out = tmp_path / "structure.json"
    subprocess.run(
        [sys.executable, "benchmarks/structure.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    records = json.loads(out.read_text())["records"]
    dense = [r for r in records if r["figure"] == "dense/trace"]
    eigen = [r for r in records if r["figure"] == "eigh/cached"]
    assert {(r["loss"], r["operator"]) for r in dense} == {
        (loss, op) for loss in ("mse", "ce") for op in ("GGN", "EF", "MC1")
    }
    assert {r["operator"] for r in eigen} == {"EF", "MC1"}
    for r in dense:
        assert r["max_abs_difference"] < 1e-10
        assert r["speedup_to_dense"] > 0 and r["speedup_trace"] > 0
    for r in eigen:
        assert r["max_rel_eigenvalue_difference"] < 1e-4
        assert r["cached_vs_streaming_rel_difference"] < 1e-5
        assert r["speedup_eigh"] > 0 and r["speedup_cached"] > 0
