"""Timing and peak-memory primitives.

Timing: wall-clock ``time.perf_counter`` around one call, one warm-up call, then the
median (and minimum) of ``repeats`` calls; calls whose times are compared are timed
in interleaved rounds (:func:`time_calls`).

Memory: the peak resident set size (RSS) a call adds on top of the RSS before it, from
the process' RSS high-water mark (:func:`peak_rss_bytes`). Because the high-water mark
never goes down by itself, it only measures a call if nothing before the call peaked
higher; on Linux, writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
RSS, which :func:`reset_peak_rss` does when it is allowed to. See ``benchmarks/README.md`` for the method and its limits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Time a call: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        fn: The call to time.
        repeats: Number of timed calls (at least 1).
        warmup: Number of untimed calls before.

    Returns:
        ``{"median": s, "min": s, "samples": [s, ...]}`` in seconds.
    """
    return time_calls({"call": fn}, repeats, warmup)["call"]


def time_calls(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Time several calls in interleaved rounds (each round calls each once, in turn).

    Ratios of the medians then compare calls made at the same times, so a machine
    whose speed drifts (other jobs, frequency) affects all of them alike.

    Args:
        fns: The calls to time, by name.
        repeats: Number of rounds (at least 1).
        warmup: Number of untimed rounds before.

    Returns:
        ``{name: {"median": s, "min": s, "samples": [s, ...]}}`` in seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {
        name: {
            "median": statistics.median(times),
            "min": min(times),
            "samples": times,
        }
        for name, times in samples.items()
    }


def peak_rss_bytes() -> int:
    """The RSS high-water mark of this process in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water mark of
    this process' own address space, which :func:`reset_peak_rss` resets.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` reports the same figure but never less than
    the RSS the process had when it was forked (the parent's size, inherited through
    ``exec``), which for a small workload hides the measured call entirely. Elsewhere,
    ``ru_maxrss`` is used.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux: KiB


def release_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc only)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0).

    Returns:
        Whether the reset worked.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


#: Environment of the processes that measure memory. glibc serves a large allocation
#: with its own ``mmap`` (returned to the system when freed, so the RSS shows it
#: while it lives) only above a threshold that it raises each time such a block is
#: freed; blocks below it come from the heap, whose freed pages the RSS may or may
#: not still hold. The history that moves the threshold differed between fresh
#: processes, and W2's product measured 23-31 MB or 19 MB in different processes.
#: A fixed threshold (the default's start, 128 KiB) makes every large tensor an
#: ``mmap`` of its own: the same figure in every process, to 0.1 MB.
MEMORY_JOB_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

#: Calls measured after the first for the ``steady`` figure (their median is kept).
STEADY_CALLS = 3


def measure_steady_memory(fn: Callable[[], Any]) -> dict[str, Any]:
    """Median peak RSS that a call adds, over :data:`STEADY_CALLS` calls.

    Each call is measured as by :func:`measure_memory`; the median keeps one call's
    outlier (pages the allocator faults back in, a thread's scratch memory) from
    standing for the call.

    Args:
        fn: The call.

    Returns:
        :func:`measure_memory`'s dictionary with ``bytes`` the median over the calls
        and ``samples`` every call's figure.
    """
    calls = [measure_memory(fn) for _ in range(STEADY_CALLS)]
    samples = [call["bytes"] for call in calls]
    return {
        **calls[0],
        "bytes": int(statistics.median(samples)),
        "peak_reset": all(call["peak_reset"] for call in calls),
        "samples": samples,
    }


def measure_memory(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS that one call adds, in bytes.

    Frees what can be freed, resets the RSS high-water mark where possible, then
    returns the high-water mark after the call minus the one before it. Without a
    reset, the result is ``max(0, peak during the call - earlier peak)``, so it is only
    meaningful if nothing before the call peaked higher (no warm-up call).

    Args:
        fn: The call; its result is dropped only after the measurement.

    Returns:
        ``{"bytes": int, "peak_reset": bool, "baseline_bytes": int}``, where
        ``baseline_bytes`` is the high-water mark just before the call.
    """
    release_free_memory()
    reset = reset_peak_rss()
    before = peak_rss_bytes()
    result = fn()
    after = peak_rss_bytes()
    del result
    return {"bytes": after - before, "peak_reset": reset, "baseline_bytes": before}
