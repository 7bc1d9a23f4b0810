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


def trend(name: str, xs: list[int], ys: list[float], rel: float = 0.05) -> tuple[str, str]:
    """Verdict (English, 中文) on how ``ys`` moves as ``xs`` grows. Steps smaller than ``rel`` (a
    fraction of the value) are noise that another CPU could flip, so they count as flat."""
    if len(xs) != len(ys) or len(ys) < 2:
        raise ValueError("a trend needs two or more (x, y) pairs of equal length")
    pct = f"{rel * 100:g}%"
    ends = f"{ys[0]:.4g} → {ys[-1]:.4g}"
    if all(abs(y - ys[0]) <= rel * abs(ys[0]) for y in ys):
        return (
            f"{name}: stays within ±{pct} of its first value ({ends})",
            f"{name}：始终在第一个值的 ±{pct} 以内（{ends}）",
        )
    rises = [(xs[i], xs[i + 1]) for i in range(len(ys) - 1) if ys[i + 1] > ys[i] * (1 + rel)]
    steps = ", ".join(f"{a}→{b}" for a, b in rises)
    if ys[-1] < ys[0] * (1 - rel) and not rises:
        return (
            f"{name}: falls, no step rising by more than {pct} ({ends})",
            f"{name}：下降，没有一步上升超过 {pct}（{ends}）",
        )
    if ys[-1] < ys[0] * (1 - rel):
        return (
            f"{name}: falls overall ({ends}) but rises by more than {pct} at {steps}",
            f"{name}：总体下降（{ends}），但在 {steps} 处上升超过 {pct}",
        )
    return (
        f"{name}: does not fall overall ({ends})",
        f"{name}：总体没有下降（{ends}）",
    )


def ptq_qat_table(runs: dict[str, list[float]], steps: int):
    """The PTQ-versus-QAT table of 5.3c in both languages, from ``qat.qat_vs_ptq`` runs. No
    timings inside: a time with one more digit would widen the column (print times apart)."""
    from mldeploy.book import bilingual

    s = {label: f"{summarize(v).mean:.3f} ± {summarize(v).std:.3f}" for label, v in runs.items()}
    fp32 = (f"{steps} 步 FP32 微调", f"{steps} FP32 steps")
    qat_cost = ("训练循环与数据（时间见表上方）", "training loop and data (times above the table)")
    return bilingual.table(
        [
            ("方法", "method"),
            ("再训练", "retraining"),
            ("留出集困惑度", "held-out ppl"),
            ("量化本身的代价", "the quantization's own cost"),
        ],
        [
            ["PTQ (RTN)", fp32, s["PTQ RTN"], ("只做舍入，不需要数据", "rounding only, no data")],
            [
                "PTQ (GPTQ)",
                fp32,
                s["PTQ GPTQ"],
                ("校准窗口与 Hessian", "calibration windows, Hessians"),
            ],
            ["QAT", (f"{steps} 步伪量化训练", f"{steps} fake-quant steps"), s["QAT"], qat_cost],
            [("FP32 微调", "FP32 fine-tuned"), fp32, s["FP32 fine-tuned"], "-"],
        ],
        align="llrl",
    )


def calibration_trends(rows: list[tuple[int, dict[str, float], float]]) -> list[tuple[str, str]]:
    """``trend`` of each layer's GPTQ error and of the INT8 perplexity over the calibration sizes
    of ``benchmark.calibration_curve`` rows, as (中文, English) pairs."""
    sizes = [n for n, _, _ in rows]
    series = {k: [errors[k] for _, errors, _ in rows] for k in rows[0][1]}
    verdicts = [tuple(reversed(trend(name, sizes, ys))) for name, ys in series.items()]
    # a perplexity moves by tenths of a percent here, far more than it drifts between CPUs
    ppl = [ppl for _, _, ppl in rows]
    return [*verdicts, tuple(reversed(trend("INT8 ppl", sizes, ppl, rel=0.001)))]
