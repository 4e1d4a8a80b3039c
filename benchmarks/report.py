"""Turn job results into records (JSON) and a text table."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.libraries import OURS, THEIRS
from benchmarks.worker import EXTRAS

#: Columns of the table (after workload, threads, operator).
BASE_COLUMNS = [
    "grad ms",
    "mv/grad",
    "mm16/grad",
    "mm16/mv",
    "build/mv",
    "mem mv/grad",
    "agree",
]
COMPARE_COLUMNS = ["ours/theirs mv", "ours/theirs mm16"]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` if both are positive and finite, else ``None``."""
    if a is None or b is None:
        return None
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return None
    return a / b


def median(times: dict[str, Any], key: str) -> float | None:
    """Median seconds of ``times[key]``, ``None`` if missing or failed."""
    entry = times.get(key)
    return entry.get("median") if isinstance(entry, dict) else None


def memory_bytes(memory: dict[str, Any] | None) -> int | None:
    """The reported peak extra memory of a call.

    The ``steady`` figure (a call after a first one, with the high-water mark reset
    in between) where there is one, since the first call in a fresh process also pays
    one-time costs (lazy imports, kernel and thread-pool set-up); else ``first``.

    Args:
        memory: ``{"first": ..., "steady": ...}`` as measured (either may be absent).

    Returns:
        Bytes, or ``None``.
    """
    if not memory:
        return None
    steady = memory.get("steady")
    if steady and steady["peak_reset"]:
        return steady["bytes"]
    first = memory.get("first")
    return first["bytes"] if first else None


def make_record(
    workload: str,
    threads: int,
    library: str,
    label: str,
    job: dict[str, Any],
    memory: dict[str, Any],
) -> dict[str, Any]:
    """One record with all figures of a (workload, threads, library, operator) cell.

    Args:
        workload: Workload name.
        threads: Thread setting.
        library: Library name.
        label: Operator label.
        job: The time job's result for (workload, threads).
        memory: ``{"mv": ..., "grad": ...}`` peak extra memory measurements.

    Returns:
        The record; ``ratios`` holds ``None`` where a figure is missing.
    """
    cell = job["cells"][library][label]
    times = {"grad": job["grad"], **cell["time_s"]}
    t_grad, t_mv = median(times, "grad"), median(times, "mv")
    mem_mv, mem_grad = memory_bytes(memory.get("mv")), memory_bytes(memory.get("grad"))
    ratios = {
        "mv/grad": ratio(t_mv, t_grad),
        "mm16/grad": ratio(median(times, "mm16"), t_grad),
        "mm16/mv": ratio(median(times, "mm16"), t_mv),
        "build/mv": ratio(median(times, "build"), t_mv),
        "mem mv/grad": ratio(mem_mv, mem_grad),
    }
    for name in EXTRAS:
        if name in times:
            ratios[f"{name}/mv"] = ratio(median(times, name), t_mv)
    agreement = (job.get("agreement") or {}).get(label)
    return {
        "workload": workload,
        "threads": threads,
        "library": library,
        "operator": label,
        "num_params": job["num_params"],
        "time_s": times,
        "memory": memory,
        "memory_bytes": {"mv": mem_mv, "grad": mem_grad},
        "ratios": ratios,
        "agreement": agreement,
        "load_average": [job.get("load_average_start"), job.get("load_average_end")],
        "error": cell["error"],
    }


def add_comparisons(records: list[dict[str, Any]]) -> None:
    """Add ``ours/theirs mv`` and ``ours/theirs mm16`` to our records, in place.

    Args:
        records: All records of the run.
    """
    theirs = {
        (r["workload"], r["threads"], r["operator"]): r
        for r in records
        if r["library"] == THEIRS
    }
    for r in records:
        other = theirs.get((r["workload"], r["threads"], r["operator"]))
        if r["library"] != OURS or other is None:
            continue
        for key in ("mv", "mm16"):
            r["ratios"][f"ours/theirs {key}"] = ratio(
                median(r["time_s"], key), median(other["time_s"], key)
            )


def _fmt(x: Any) -> str:
    """Format a table entry: ratios with about 3 significant digits."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _agree(agreement: dict[str, Any] | None) -> str:
    """``yes``/``no``, ``error`` if the check failed to run, ``-`` if not run."""
    if not agreement:
        return "-"
    if agreement.get("agree") is None:
        return "error"
    return "yes" if agreement["agree"] else "no"


def _row(r: dict[str, Any], compare: bool) -> list[str]:
    """The table entries of one of our records."""
    grad = median(r["time_s"], "grad")
    return [
        r["workload"],
        str(r["threads"]),
        r["operator"],
        _fmt(None if grad is None else 1e3 * grad),
        *(_fmt(r["ratios"].get(c)) for c in BASE_COLUMNS[1:-1]),
        _agree(r["agreement"]),
        *(_fmt(r["ratios"].get(c)) for c in COMPARE_COLUMNS if compare),
    ]


def format_table(records: list[dict[str, Any]], compare: bool) -> str:
    """The result table: one line per (workload, threads, operator), our figures.

    Args:
        records: All records of the run.
        compare: Add the ours-over-theirs columns.

    Returns:
        The table as text (with the failed cells of any library listed below it).
    """
    columns = ["workload", "threads", "op", *BASE_COLUMNS]
    if compare:
        columns += COMPARE_COLUMNS
    rows = [_row(r, compare) for r in records if r["library"] == OURS]
    widths = [
        max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in rows]
    lines += [
        f"failed: {r['workload']} threads={r['threads']} {r['library']}"
        f" {r['operator']}: {r['error']}"
        for r in records
        if r["error"]
    ]
    return "\n".join(lines)


def format_extras(records: list[dict[str, Any]]) -> str | None:
    """Table of ``to_dense``/``trace``/``eigh`` times over a matvec, if any were timed.

    Args:
        records: All records of the run.

    Returns:
        The table, or ``None`` if no record has such a figure.
    """
    keys = [f"{name}/mv" for name in EXTRAS]
    rows = [r for r in records if any(k in r["ratios"] for k in keys)]
    if not rows:
        return None
    lines = [
        f"{'workload':>8}  {'threads':>7}  {'library':>17}  {'op':>4}  "
        + "  ".join(f"{k:>12}" for k in keys)
    ]
    for r in rows:
        values = "  ".join(f"{_fmt(r['ratios'].get(k)):>12}" for k in keys)
        lines.append(
            f"{r['workload']:>8}  {r['threads']:>7}  {r['library']:>17}  {r['operator']:>4}  {values}"
        )
    return "\n".join(lines)
