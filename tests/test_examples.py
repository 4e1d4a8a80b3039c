"""Every gallery example runs (smoke mode) and the documentation builds without warnings."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(
    path.name
    for path in (ROOT / "docs" / "examples").glob("*.py")
    if path.name != "quickstart.py"  # run in full by tests/test_repository.py
)


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_in_smoke_mode(name):
    result = run(
        [sys.executable, str(ROOT / "docs" / "examples" / name)],
        CURVLINOPS_FISHER_SMOKE="1",
        OMP_NUM_THREADS="1",  # the suite runs examples side by side
        MPLBACKEND="Agg",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"


def test_gallery_lists_every_example():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from gallery_order import ORDER
    finally:
        sys.path.pop(0)
    assert sorted(ORDER) == sorted([*EXAMPLES, "quickstart.py"])


@pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ["sphinx", "furo", "sphinx_gallery", "myst_parser"]
    ),
    reason="Sphinx, furo, sphinx-gallery or myst-parser not installed "
    "(pip install -e '.[docs]')",
)
def test_documentation_builds_without_warnings(tmp_path):
    result = run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-D",
            "plot_gallery=0",
            "-d",
            str(tmp_path / "doctrees"),
            "docs",
            str(tmp_path / "html"),
        ]
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "html" / "api.html").exists()
