"""curvlinops 3.0.1's own tests for the operators and estimators we replace, run on us.

``tests/compat/run_curvlinops_tests.py`` downloads curvlinops' source distribution and
runs its test files for the GGN, MC Fisher, EF and the estimators with the names they
import from ``curvlinops`` rebound to curvlinops_fisher's (see ``tests/compat/README.md``).
Here it runs its CI subset; if the download fails, the test is skipped with the
script's one-line reason, never passed. The other tests check the runner's own
machinery without a download.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "curvlinops", reason="curvlinops is needed (see tests/compare-requirements.txt)"
)

COMPAT = Path(__file__).resolve().parent / "compat"
SCRIPT = COMPAT / "run_curvlinops_tests.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_curvlinops_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def _run(args: list[str], cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=900,
    )


def test_curvlinops_own_tests_pass_against_curvlinops_fisher() -> None:
    result = _run([sys.executable, str(SCRIPT), "--subset", "ci"])
    output = result.stdout + result.stderr
    if result.returncode == runner.DOWNLOAD_FAILED:
        (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("DOWNLOAD")]
        pytest.skip(line)
    assert result.returncode == 0, output[-6000:]
    assert "rebinding verified" in result.stdout
    summary = re.search(
        r"RESULT \(ours, ci\): (\d+) passed, 0 failed, 0 errors", output
    )
    assert summary is not None, output[-6000:]
    assert int(summary.group(1)) >= 200


def test_download_failure_is_one_line(tmp_path: Path) -> None:
    pip_args = f"--no-index --find-links {tmp_path}"  # an empty package index
    result = _run([sys.executable, str(SCRIPT), "--pip-args", pip_args])
    assert result.returncode == runner.DOWNLOAD_FAILED
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("DOWNLOAD FAILED: pip download curvlinops-for-pytorch")


FAKE_TEST = """
{imports}

def test_nothing():
    pass
"""


@pytest.mark.parametrize(
    "imports, expected_rc",
    [
        ("from curvlinops import GGNLinearOperator, xtrace", 0),
        # curvlinops' own class, bypassing the rebinding: the plugin must stop the run
        ("from curvlinops.ggn import GGNLinearOperator", 4),
        # a module importing none of the rebound names is not evidence either
        ("from curvlinops import KFACLinearOperator", 4),
    ],
)
def test_plugin_checks_the_rebinding(
    tmp_path: Path, imports: str, expected_rc: int
) -> None:
    (tmp_path / "test_fake.py").write_text(FAKE_TEST.format(imports=imports))
    report = tmp_path / "report"
    report.mkdir()
    env = {
        "PYTHONPATH": str(COMPAT),
        "CURVLINOPS_COMPAT_REPORT": str(report),
        "CURVLINOPS_COMPAT_MODE": "ours",
    }
    cmd = [sys.executable, "-m", "pytest", "-p", "curvlinops_rebind", "-q"]
    result = _run([*cmd, "-p", "no:cacheprovider", "test_fake.py"], tmp_path, env)
    assert result.returncode == expected_rc, result.stdout + result.stderr
    problems, modules, _ = runner.read_reports(report, "ours")
    assert bool(problems) == (expected_rc != 0)
    if expected_rc == 0:
        assert modules["test_fake"] == {
            "GGNLinearOperator": "curvlinops_fisher.curvature.GGNLinearOperator",
            "xtrace": "curvlinops_fisher.estimators.xtrace",
        }
    else:
        assert "rebinding did not take effect" in result.stdout


def test_read_reports_rejects_foreign_objects(tmp_path: Path) -> None:
    assert runner.read_reports(tmp_path, "ours")[0]  # no report at all
    report = {
        "mode": "ours",
        "modules": {"test.test_ggn": {"GGNLinearOperator": "curvlinops.ggn.GGN"}},
        "problems": [],
        "deselected": {},
    }
    (tmp_path / "rebinding-1.json").write_text(json.dumps(report))
    (problem,) = runner.read_reports(tmp_path, "ours")[0]
    assert "test.test_ggn.GGNLinearOperator is curvlinops.ggn.GGN" in problem
    assert len(runner.read_reports(tmp_path, "control")[0]) == 1  # mode mismatch


def test_every_test_file_is_classified() -> None:
    assert not set(runner.SELECTED) & set(runner.EXCLUDED)
    assert all(reason for reason in runner.EXCLUDED.values())
    assert runner.DESELECTED == {}
