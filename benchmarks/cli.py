"""Command line of the benchmark: parse options, run the jobs, report.

Timing runs in one fresh process per (workload, threads); every memory figure in
one fresh process per measured call (see ``benchmarks/worker.py``). ``--smoke`` runs
everything in this process on shrunken workloads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.libraries import (
    AGREEMENT_OPERATORS,
    OPERATORS,
    OURS,
    THEIRS,
    load_library,
)
from benchmarks.machine import load_average, machine_info, usable_cpus
from benchmarks.measure import MEMORY_JOB_ENV
from benchmarks.report import add_comparisons, format_extras, format_table, make_record
from benchmarks.worker import JOBS
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("benchmarks") / "results" / "latest.json"
DEFAULT_REPEATS = 7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The options, with ``workloads`` and ``threads`` as lists.
    """
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of " + ",".join(WORKLOADS),
    )
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts; 'all' = usable CPUs (default 1,all; 1 with --smoke)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed calls per figure (median; default {DEFAULT_REPEATS}, 1 with --smoke)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also benchmark curvlinops (if importable)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny workloads, 1 repeat, in-process (< 30 s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON output (default {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    if args.threads is None:
        args.threads = "1" if args.smoke else "1,all"
    threads = []
    for t in args.threads.split(","):
        t = t.strip()
        n = usable_cpus() if t == "all" else int(t) if t.isdigit() else 0
        if n < 1:
            parser.error(f"--threads: {t!r} is neither a positive int nor 'all'")
        if n not in threads:
            threads.append(n)
    args.threads = threads
    if args.repeats is None:
        args.repeats = 1 if args.smoke else DEFAULT_REPEATS
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def run_job(spec: dict[str, Any], in_process: bool) -> dict[str, Any]:
    """Run a worker job, in a fresh Python process unless ``in_process``.

    Args:
        spec: The job specification (see ``benchmarks/worker.py``).
        in_process: Run it in this process instead.

    Returns:
        The job's result, or ``{"job_error": message}`` if the process failed.
    """
    if in_process:
        return JOBS[spec["job"]](spec)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
            **(MEMORY_JOB_ENV if spec["job"] == "memory" else {}),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            return {"job_error": f"worker exited with {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def log(message: str) -> None:
    """Progress message on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def time_workload(
    args: argparse.Namespace,
    workload: str,
    threads: int,
    libraries: list[str],
    agreement: bool,
) -> dict[str, Any]:
    """Run the time job of one (workload, threads) and log its duration."""
    start = time.perf_counter()
    spec = {
        "job": "time",
        "workload": workload,
        "threads": threads,
        "libraries": libraries,
        "theirs": THEIRS,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "agreement": agreement,
        "memory": args.smoke,
    }
    job = run_job(spec, in_process=args.smoke)
    if "job_error" in job:
        raise RuntimeError(f"{workload} threads={threads}: {job['job_error']}")
    log(f"[{workload} threads={threads}] timed in {time.perf_counter() - start:.1f} s")
    return job


def measure_workload_memory(
    args: argparse.Namespace,
    workload: str,
    threads: int,
    libraries: list[str],
    job: dict[str, Any],
) -> dict[tuple[str, str], dict[str, Any]]:
    """Peak extra memory per (library, operator) and of the gradient pass.

    ``--smoke`` uses the in-process figures of the time job; otherwise one fresh
    process per measured call.

    Returns:
        ``{(library, label): {"mv": ..., "grad": ...}}``.
    """
    if args.smoke:
        return {
            (lib, label): {
                "mv": job["cells"][lib][label]["memory"].get("mv"),
                "grad": job["grad_memory"],
            }
            for lib in libraries
            for label in OPERATORS
        }
    start = time.perf_counter()
    base = {"job": "memory", "workload": workload, "threads": threads, "smoke": False}
    grad = run_job({**base, "target": "grad"}, in_process=False)
    result = {}
    for lib in libraries:
        for label in OPERATORS:
            mv = None
            if job["cells"][lib][label]["error"] is None:
                mv = run_job({**base, "target": f"{lib}:{label}"}, in_process=False)
            result[lib, label] = {"mv": mv, "grad": grad}
    log(
        f"[{workload} threads={threads}] memory measured in {time.perf_counter() - start:.1f} s"
    )
    return result


def select_libraries(compare: bool) -> tuple[list[str], bool]:
    """The libraries to benchmark, and whether curvlinops can be imported at all.

    Args:
        compare: Whether ``--compare`` was given.

    Returns:
        ``([OURS] or [OURS, THEIRS], theirs_available)``.
    """
    theirs_available = load_library(THEIRS) is not None
    if compare and not theirs_available:
        log(
            f"--compare: cannot import {THEIRS}; continuing with {OURS} only. Install it"
            " with `pip install --no-deps -r tests/compare-requirements.txt`."
        )
    if not theirs_available:
        log(f"agreement check skipped: {THEIRS} is not importable.")
    libraries = [OURS, THEIRS] if compare and theirs_available else [OURS]
    return libraries, theirs_available


def collect_records(
    args: argparse.Namespace, libraries: list[str], check_agreement: bool
) -> list[dict[str, Any]]:
    """Run all jobs and turn their results into records.

    Args:
        args: The parsed options.
        libraries: The libraries to benchmark.
        check_agreement: Compare products with curvlinops (once per workload, at the
            first thread setting).

    Returns:
        One record per (workload, threads, library, operator).
    """
    records = []
    for workload in args.workloads:
        agreement = None
        for i, threads in enumerate(args.threads):
            job = time_workload(
                args, workload, threads, libraries, check_agreement and i == 0
            )
            agreement = job["agreement"] if i == 0 else agreement
            job["agreement"] = agreement
            memory = measure_workload_memory(args, workload, threads, libraries, job)
            for lib in libraries:
                for label in OPERATORS:
                    record = make_record(
                        workload, threads, lib, label, job, memory[lib, label]
                    )
                    record["description"] = WORKLOADS[workload].description
                    records.append(record)
    add_comparisons(records)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    libraries, theirs_available = select_libraries(args.compare)
    info = machine_info(args.threads)
    records = collect_records(args, libraries, theirs_available)
    elapsed = time.perf_counter() - start
    info.update(
        load_average_end=load_average(),
        command=" ".join(["python", "benchmarks/run.py", *argv]),
        repeats=args.repeats,
        smoke=args.smoke,
        compare=args.compare,
        libraries=libraries,
        agreement_operators=list(AGREEMENT_OPERATORS) if theirs_available else [],
        memory_method=(
            "in-process, after the timed calls (smoke)"
            if args.smoke
            else "fresh process per call, MALLOC_MMAP_THRESHOLD_=131072; steady = median of calls 2-4, peak reset before each"
        ),
        elapsed_s=round(elapsed, 1),
    )

    print(format_table(records, compare=THEIRS in libraries))
    extras = format_extras(records)
    if extras:
        print("\n" + extras)
    print(f"\n{len(records)} records in {elapsed:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "records": records}, indent=1))
    log(f"wrote {args.out}")
    return 0
