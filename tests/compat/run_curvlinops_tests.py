"""Run curvlinops 3.0.1's own tests for the GGN, MC Fisher, EF and estimators against us.

At run time, ``pip download`` fetches the source distribution of
``curvlinops-for-pytorch==3.0.1`` (which ships curvlinops' ``test/`` folder) into a
temporary folder; nothing of it is kept or committed. The selected test files then run
with pytest in a subprocess, with the plugin ``curvlinops_rebind.py`` (next to this
file) rebinding the names the tests import from ``curvlinops`` (the three operators
and six estimators) to curvlinops_fisher's before any test module is imported.
curvlinops' brute-force references (``curvlinops.examples.functorch``,
``curvlinops.sampling``) stay curvlinops' own and are the ground truth. The plugin
and this script both check that every collected test module sees our objects.

Usage (from the repository root, with curvlinops installed as in
``tests/compare-requirements.txt``)::

    python tests/compat/run_curvlinops_tests.py                # full selection
    python tests/compat/run_curvlinops_tests.py --subset ci    # the CI subset
    python tests/compat/run_curvlinops_tests.py --control      # against curvlinops
    python tests/compat/run_curvlinops_tests.py -- -n 2 -x     # extra pytest args

Exit codes: pytest's (0: all passed), ``3`` if the download failed (one line starting
with ``DOWNLOAD FAILED:`` says why), ``4`` if the rebinding did not take effect.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

#: The peer release whose tests are run.
REQUIREMENT = "curvlinops-for-pytorch==3.0.1"

#: Test files whose subject is the public API we replace, with what they check.
SELECTED = {
    "test/test_ggn.py": "GGNLinearOperator vs. functorch_ggn: tensor, tensor-list and "
    "SciPy products, adjoint, matvec and matmat, repeated products",
    "test/test_fisher.py": "FisherMCLinearOperator: averaged over seeds (_seed += 1 "
    "after each product), converges to functorch_ggn",
    "test/test_gradient_moments.py": "EFLinearOperator vs. "
    "functorch_empirical_fisher: tensor, tensor-list and SciPy products, adjoint",
    "test/trace/test_hutchinson.py": "hutchinson_trace converges to the trace",
    "test/trace/test_meyer2020hutch.py": "hutchpp_trace converges to the trace",
    "test/trace/test_epperly2024xtrace.py": "xtrace converges, and equals the naive "
    "leave-one-out algorithm under the same torch.manual_seed",
    "test/diagonal/test_hutchinson.py": "hutchinson_diag converges to the diagonal",
    "test/diagonal/test_epperly2024xtrace.py": "xdiag converges, and equals the naive "
    "leave-one-out algorithm under the same torch.manual_seed",
    "test/norm/test_hutchinson.py": "hutchinson_squared_fro converges (rectangular A)",
}

#: Test files not run, each with the reason.
EXCLUDED = {
    "test/test__torch_base.py": "private base classes: subclasses curvlinops' "
    "_torch_base.PyTorchLinearOperator/CurvatureLinearOperator",
    "test/test_hessian.py": "Hessian operator: not a Fisher-family operator",
    "test/test_jacobian.py": "Jacobian operators: outside the drop-in",
    "test/test_kfac.py": "KFAC: outside the drop-in",
    "test/test_ekfac.py": "EKFAC: outside the drop-in",
    "test/test_inverse.py": "inverse operators (CG, LSMR, Neumann, KFAC inverse): "
    "outside the drop-in",
    "test/test_submatrix.py": "SubmatrixLinearOperator: outside the drop-in",
    "test/test_utils.py": "private utility curvlinops.utils.split_list",
    "test/experimental/test_activation_hessian.py": "experimental activation Hessian: "
    "outside the drop-in",
    "test/papyan2020traces/test_spectrum.py": "Lanczos spectral density "
    "(papyan2020traces): outside the drop-in",
}

#: Single tests not run, each with the reason: node id regex -> reason. Empty: every
#: test of the selected files runs, and none is deselected because it fails.
DESELECTED: dict[str, str] = {}

#: The CI subset (``--subset ci``) leaves out these slow tests (node id regex ->
#: reason); every selected file and every operator case still runs.
CI_LEFT_OUT = {
    r"^test/test_fisher\.py::.*mc_samples=1\]$": "MC Fisher averaged over up to "
    "10,000 products of 1 sample (most of the full run's time); the CI subset keeps "
    "the variant with 100 products of 100 samples",
    r"^test/diagonal/.*num_matvecs=4\]$": "slowest diagonal convergence checks "
    "(up to 100,000 products); the CI subset keeps num_matvecs=10",
}

DOWNLOAD_FAILED = 3
REBINDING_FAILED = 4
_HERE = Path(__file__).resolve().parent


def download(folder: Path, pip_args: list[str]) -> Path | str:
    """Download the source distribution with pip.

    Args:
        folder: Where to put it.
        pip_args: Extra arguments for ``pip download``.

    Returns:
        The path of the ``.tar.gz``, or a one-line reason why the download failed.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary"]
    cmd += [":all:", "--disable-pip-version-check", "-q", "-d", str(folder)]
    result = subprocess.run(
        [*cmd, *pip_args, REQUIREMENT], capture_output=True, text=True
    )
    archives = sorted(folder.glob("*.tar.gz"))
    if result.returncode != 0 or len(archives) != 1:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {result.returncode}"
        return f"pip download {REQUIREMENT} failed ({last})"
    return archives[0]


def unpack(archive: Path, folder: Path) -> Path:
    """Unpack the source distribution; return its root (the folder with ``test/``)."""
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    (root,) = [p for p in folder.iterdir() if p.is_dir()]
    return root


def check_classification(root: Path) -> None:
    """Every test file of the distribution is either selected or excluded.

    Raises:
        RuntimeError: If a test file is unclassified, or a classified one is missing.
    """
    present = {p.relative_to(root).as_posix() for p in root.glob("test/**/test_*.py")}
    classified = set(SELECTED) | set(EXCLUDED)
    if present != classified:
        raise RuntimeError(
            f"test files of {REQUIREMENT} changed: unclassified "
            f"{sorted(present - classified)}, missing {sorted(classified - present)}"
        )


def pytest_command(report: Path, extra: list[str]) -> list[str]:
    """The pytest command line (run in the distribution's root)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "curvlinops_rebind"]
    cmd += ["-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={report}"]
    return [*cmd, *SELECTED, *extra]


def read_reports(
    report_dir: Path, mode: str
) -> tuple[list[str], dict[str, dict[str, str]], dict[str, int]]:
    """Read and check the plugin's reports (one per pytest process).

    Args:
        report_dir: Where the plugin wrote ``rebinding-<pid>.json``.
        mode: ``"ours"`` or ``"control"``.

    Returns:
        The problems (empty if every collected test module saw the expected objects),
        the rebound names each module holds with the object's origin, and the number
        of tests each deselection pattern removed.
    """
    reports = [json.loads(p.read_text()) for p in report_dir.glob("rebinding-*.json")]
    if not reports:
        return ["the plugin curvlinops_rebind wrote no report (was it loaded?)"], {}, {}
    expected_package = "curvlinops." if mode == "control" else "curvlinops_fisher."
    problems, modules, deselected = [], {}, {}
    for report in reports:
        problems += report["problems"]
        if report["mode"] != mode:
            problems.append(f"plugin ran in mode {report['mode']!r}, not {mode!r}")
        modules.update(report["modules"])
        for pattern, count in report["deselected"].items():
            deselected[pattern] = max(count, deselected.get(pattern, 0))
    for module, names in modules.items():
        for name, origin in names.items():
            if not origin.startswith(expected_package):
                problems.append(f"{module}.{name} is {origin}")
    return problems, modules, deselected


def summarize(junit: Path) -> str:
    """One line with the counts of passed, failed, errored and skipped tests."""
    if not junit.exists():
        return "no test report"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failed, errors, skipped = (
        int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")
    )
    passed = tests - failed - errors - skipped
    return f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--control",
        action="store_true",
        help="run the same selection against curvlinops itself (no rebinding)",
    )
    parser.add_argument("--subset", choices=["full", "ci"], default="full")
    parser.add_argument(
        "--sdist", type=Path, help="use this downloaded .tar.gz instead of pip"
    )
    parser.add_argument(
        "--pip-args", default="", help="extra arguments for pip download (one string)"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest args, after --")
    args = parser.parse_args(argv)
    mode = "control" if args.control else "ours"

    deselect = dict(DESELECTED)
    if args.subset == "ci":
        deselect.update(CI_LEFT_OUT)
    against = "curvlinops (control)" if args.control else "curvlinops_fisher"

    with tempfile.TemporaryDirectory(prefix="curvlinops-compat-") as tmp:
        tmp = Path(tmp)
        archive = args.sdist
        if archive is None:
            (tmp / "download").mkdir()
            archive = download(tmp / "download", shlex.split(args.pip_args))
            if isinstance(archive, str):
                print(f"DOWNLOAD FAILED: {archive}", flush=True)
                return DOWNLOAD_FAILED
        (tmp / "src").mkdir()
        root = unpack(archive.resolve(), tmp / "src")
        check_classification(root)
        report_dir, junit = tmp / "report", tmp / "junit.xml"
        report_dir.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(_HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "CURVLINOPS_COMPAT_MODE": mode,
            "CURVLINOPS_COMPAT_REPORT": str(report_dir),
            "CURVLINOPS_COMPAT_DESELECT": json.dumps(deselect),
        }
        cmd = pytest_command(junit, args.pytest_args)
        print(f"running {REQUIREMENT}'s tests ({args.subset}) against {against}")
        print(f"{len(SELECTED)} files selected, {len(EXCLUDED)} excluded (see script)")
        print(" ".join(cmd[1:]), flush=True)
        returncode = subprocess.run(cmd, cwd=root, env=env).returncode
        problems, modules, deselected = read_reports(report_dir, mode)
        summary = summarize(junit)

    for pattern, count in deselected.items():
        print(f"deselected {count} tests matching {pattern}: {deselect[pattern]}")
    if problems:
        print("REBINDING FAILED: " + "; ".join(problems), flush=True)
        return REBINDING_FAILED
    print(f"rebinding verified: every collected test module sees {against}'s objects:")
    for module, names in sorted(modules.items()):
        print(f"  {module}: " + ", ".join(f"{n} -> {o}" for n, o in names.items()))
    print(f"RESULT ({mode}, {args.subset}): {summary}", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
