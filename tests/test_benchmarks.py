"""The benchmark harness runs end to end (``--smoke``) and writes complete JSON.

No timing assertions: only that every cell exists and its ratios are positive and
finite, and that the products the benchmark times agree with curvlinops'.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.libraries import OPERATORS, OURS, THEIRS
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
TIME_RATIOS = ("mv/grad", "mm16/grad", "mm16/mv", "build/mv")
HAVE_CURVLINOPS = importlib.util.find_spec(THEIRS) is not None


def run_benchmark(
    out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def positive_finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def records_by_cell(data: dict[str, Any], library: str) -> dict[tuple, dict]:
    return {
        (r["workload"], r["threads"], r["operator"]): r
        for r in data["records"]
        if r["library"] == library
    }


def check_library_records(data: dict[str, Any], library: str) -> dict[tuple, dict]:
    cells = records_by_cell(data, library)
    threads = data["machine"]["thread_settings"]
    expected = {(w, t, op) for w in WORKLOADS for t in threads for op in OPERATORS}
    assert set(cells) == expected
    for cell, record in cells.items():
        assert record["error"] is None, (cell, record["error"])
        for key in TIME_RATIOS:
            assert positive_finite(record["ratios"][key]), (cell, key, record["ratios"])
    return cells


def test_smoke_run_writes_a_record_per_workload_and_operator(tmp_path):
    out = tmp_path / "x.json"
    result = run_benchmark(out)
    data = json.loads(out.read_text())
    for key in (
        "platform",
        "cpu_count",
        "torch",
        "versions",
        "thread_settings",
        "date",
    ):
        assert key in data["machine"]
    assert data["machine"]["versions"][OURS]
    check_library_records(data, OURS)
    assert "mv/grad" in result.stdout  # the table is printed


@pytest.mark.skipif(
    not HAVE_CURVLINOPS,
    reason=f"{THEIRS} is not importable (pip install --no-deps -r "
    "tests/compare-requirements.txt)",
)
def test_smoke_run_with_compare(tmp_path):
    out = tmp_path / "x.json"
    run_benchmark(out, "--compare")
    data = json.loads(out.read_text())
    ours = check_library_records(data, OURS)
    check_library_records(data, THEIRS)
    for cell, record in ours.items():
        for key in ("ours/theirs mv", "ours/theirs mm16"):
            assert positive_finite(record["ratios"][key]), (cell, key)
        # the benchmark times the same computation as curvlinops
        assert record["agreement"]["agree"] is True, (cell, record["agreement"])


def test_compare_without_curvlinops_continues(tmp_path):
    # a package named like curvlinops that fails to import shadows the real one
    shadow = tmp_path / "shadow" / THEIRS
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])}
    out = tmp_path / "x.json"
    result = run_benchmark(out, "--compare", "--workloads", "W5", env=env)
    assert f"cannot import {THEIRS}" in result.stderr
    data = json.loads(out.read_text())
    assert {r["library"] for r in data["records"]} == {OURS}
    assert all(r["agreement"] is None for r in data["records"])


def test_memory_job_in_a_fresh_process(tmp_path):
    out = tmp_path / "m.json"
    spec = {
        "job": "memory",
        "workload": "W5",
        "threads": 1,
        "smoke": True,
        "target": f"{OURS}:GGN",
    }
    subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec), str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["first"]["bytes"] >= 0
    if result["first"]["peak_reset"]:
        steady = result["steady"]
        assert len(steady["samples"]) == 3 and min(steady["samples"]) >= 0
        assert steady["bytes"] == sorted(steady["samples"])[1]


def test_memory_jobs_run_with_a_fixed_mmap_threshold(monkeypatch):
    """Memory processes get ``MALLOC_MMAP_THRESHOLD_`` (reproducible RSS figures);
    timing processes keep the allocator's default."""
    from benchmarks import cli

    seen = {}

    def fake_run(cmd, env, **kwargs):
        spec = json.loads(cmd[-2])
        seen[spec["job"]] = env.get("MALLOC_MMAP_THRESHOLD_")
        return subprocess.CompletedProcess(cmd, 1, "", "stopped by the test")

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    for job in ("memory", "time"):
        assert "job_error" in cli.run_job({"job": job}, in_process=False)
    assert seen == {
        "memory": "131072",
        "time": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
