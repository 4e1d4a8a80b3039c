"""pytest plugin that runs curvlinops' own tests against curvlinops_fisher.

Loaded with ``pytest -p curvlinops_rebind`` by ``run_curvlinops_tests.py`` (never by
this repository's own test suite). Plugins given with ``-p`` are imported before any
conftest or test module, so the rebinding below is in place when curvlinops' test
modules run ``from curvlinops import GGNLinearOperator, ...``.

- Mode ``ours`` (default): the public names of the operators and estimators we
  replace are set to curvlinops_fisher's objects on the ``curvlinops`` package. All
  other names, in particular the brute-force references in ``curvlinops.examples``
  and ``curvlinops.sampling``, stay curvlinops' own: they are the ground truth.
- Mode ``control``: nothing is rebound; the same tests run against curvlinops.

After collection, every collected test module (and ``test.utils``, whose helpers
receive the operators) must hold the expected object under each of these names it
imports, and every collected module must import at least one of them; otherwise the
run stops with exit code 4. The names found are written as JSON to the directory in
``CURVLINOPS_COMPAT_REPORT`` so that the runner checks them again.

Tests whose node id matches one of the regular expressions in
``CURVLINOPS_COMPAT_DESELECT`` (a JSON object: pattern -> reason) are deselected.

Environment:
    CURVLINOPS_COMPAT_MODE: ``ours`` or ``control``.
    CURVLINOPS_COMPAT_REPORT: Directory for ``rebinding-<pid>.json``.
    CURVLINOPS_COMPAT_DESELECT: JSON object ``{node id regex: reason}``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import curvlinops
import pytest
import torch

import curvlinops_fisher

#: The names rebound from curvlinops to curvlinops_fisher.
REBOUND = (
    "GGNLinearOperator",
    "FisherMCLinearOperator",
    "EFLinearOperator",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "hutchinson_diag",
    "xdiag",
    "hutchinson_squared_fro",
)

MODE = os.environ.get("CURVLINOPS_COMPAT_MODE", "ours")
if MODE not in ("ours", "control"):
    raise ValueError(
        f"CURVLINOPS_COMPAT_MODE must be 'ours' or 'control'; got {MODE!r}."
    )

_SOURCE = curvlinops if MODE == "control" else curvlinops_fisher
EXPECTED = {name: getattr(_SOURCE, name) for name in REBOUND}
for _name, _obj in EXPECTED.items():
    setattr(curvlinops, _name, _obj)

#: Exit code for a run in which the rebinding did not take effect.
REBINDING_FAILED = 4


def _qualified(obj: object) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def pytest_configure(config: pytest.Config) -> None:
    # The problems are tiny; intra-op threads only compete for the cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    patterns = json.loads(os.environ.get("CURVLINOPS_COMPAT_DESELECT", "{}"))
    deselected = {pattern: 0 for pattern in patterns}
    kept, dropped = [], []
    for item in items:
        matches = [p for p in patterns if re.search(p, item.nodeid)]
        for pattern in matches:
            deselected[pattern] += 1
        (dropped if matches else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

    modules = {item.module.__name__: item.module for item in items}
    if "test.utils" in sys.modules:
        modules["test.utils"] = sys.modules["test.utils"]
    found: dict[str, dict[str, str]] = {}
    problems = []
    for module_name, module in sorted(modules.items()):
        names = {n: module.__dict__[n] for n in REBOUND if n in module.__dict__}
        if not names and module_name != "test.utils":
            problems.append(f"{module_name} imports none of {', '.join(REBOUND)}")
        for name, obj in names.items():
            if obj is not EXPECTED[name]:
                problems.append(
                    f"{module_name}.{name} is {_qualified(obj)}, expected "
                    f"{_qualified(EXPECTED[name])}"
                )
        found[module_name] = {name: _qualified(obj) for name, obj in names.items()}
    report_dir = os.environ.get("CURVLINOPS_COMPAT_REPORT")
    if report_dir:
        report = {
            "mode": MODE,
            "modules": found,
            "problems": problems,
            "deselected": deselected,
        }
        path = Path(report_dir) / f"rebinding-{os.getpid()}.json"
        path.write_text(json.dumps(report, indent=1))
    if problems:
        pytest.exit(
            "rebinding did not take effect: " + "; ".join(problems),
            returncode=REBINDING_FAILED,
        )
