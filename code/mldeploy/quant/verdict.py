"""Comparisons that cannot flip between machines: a winner is named only when the runs separate.

Every comparison the chapter prints is computed here from repeated measurements (seeds, or
latency rounds), never written as a fixed string."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Mean, standard deviation, minimum and maximum of repeated measurements."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return (
            f"{self.mean:.3f} ± {self.std:.3f} (range {self.low:.3f}–{self.high:.3f}, n={self.n})"
        )


def summarize(values: list[float]) -> Summary:
    """Summary of at least two measurements."""
    if len(values) < 2:
        raise ValueError("a spread needs at least two measurements")
    return Summary(
        statistics.fmean(values), statistics.stdev(values), min(values), max(values), len(values)
    )


def lower_is_better(name_a: str, a: list[float], name_b: str, b: list[float]) -> tuple[str, str]:
    """Verdict (English, 中文) on two sets of runs of a lower-is-better measure: a winner only when
    the ranges do not overlap, i.e. every run of one beats every run of the other."""
    sa, sb = summarize(a), summarize(b)
    if sa.high < sb.low:
        return (
            f"{name_a} is lower than {name_b} in every run (ranges do not overlap)",
            f"{name_a} 在每次运行中都低于 {name_b}（范围不重叠）",
        )
    if sb.high < sa.low:
        return (
            f"{name_b} is lower than {name_a} in every run (ranges do not overlap)",
            f"{name_b} 在每次运行中都低于 {name_a}（范围不重叠）",
        )
    return (
        f"{name_a} and {name_b} differ by less than their spread: no winner",
        f"{name_a} 与 {name_b} 的差别小于随机波动：分不出胜负",
    )
