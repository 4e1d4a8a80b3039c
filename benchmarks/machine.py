"""Description of the machine and software a benchmark ran on."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.libraries import OURS, THEIRS, library_version


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    """Total RAM in GiB from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def usable_cpus() -> int:
    """Number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, ``None`` where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_state() -> dict[str, Any] | None:
    """Commit of the repository and whether the library's files differ from it.

    Returns:
        ``{"commit": sha, "library_modified": bool}``, or ``None`` outside a git
        checkout.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", "curvlinops_fisher")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "library_modified": bool(changes)}


def machine_info(threads: list[int]) -> dict[str, Any]:
    """Machine, software and thread settings of this run.

    Args:
        threads: The thread settings benchmarked.

    Returns:
        A JSON-serializable dictionary.
    """
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "ram_gib": ram_gib(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "versions": {OURS: library_version(OURS), THEIRS: library_version(THEIRS)},
        "git": git_state(),
        "thread_settings": threads,
        "thread_env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_"))
        },
        "load_average_start": load_average(),
    }
