"""Shared bits of the benchmarks: medians, ratios, one printed line per figure, and a process's cores,
CPU time and memory (read from /proc: Linux)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(name: str, value: float, unit: str, baseline: float | None = None, target: str = "", how: str = "") -> None:
    """Print a figure; with a baseline, also its ratio to it (both measured in the same run)."""
    line = f"{name:<58} {value:>10.3f} {unit:<8}"
    if baseline is not None and baseline != 0:
        line += f" ratio {value / baseline:>6.3f} vs baseline {baseline:.3f} {unit}"
    if target:
        line += f"  [target {target}]"
    print(line)
    if how:
        print(f"{'':<4}{how}")


def pin(pid: int, cores: set[int]) -> None:
    """Run every thread of the process `pid` (and those it starts later) on `cores` only."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:
            pass  # a thread that just ended


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, every thread) the process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_bytes(pid: int) -> int:
    """The process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
