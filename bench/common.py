"""Shared bits of the benchmarks: medians, ratios and one printed line per figure."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


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
