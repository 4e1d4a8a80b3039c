"""Benchmark curvlinops_fisher's operators (and, with ``--compare``, curvlinops').

Usage (from the repository root; see ``benchmarks/README.md``)::

    python benchmarks/run.py [--workloads W1,W2,...] [--threads 1,all] [--repeats N]
        [--compare] [--smoke] [--out benchmarks/results/latest.json]

Prints a table and writes a JSON file with machine information and one record per
(workload, threads, library, operator).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
