"""Figures for section 5.6."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter, ScalarFormatter

from mldeploy.llm.evaluation import FormatRow
from mldeploy.llm.generation import StepTimes


def plot_step_times(times: StepTimes, ax: Axes, mark: int = 256) -> None:
    """Milliseconds per generated token against its position t, without (✗) and with (✓) the KV
    cache; labels are symbols, as in every figure of the book (captions carry both languages)."""
    ax.plot(times.positions, np.array(times.uncached) * 1e3, label="KV cache ✗")
    ax.plot(times.positions, np.array(times.cached) * 1e3, label="KV cache ✓")
    ax.axvline(mark, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="t", ylabel="ms")  # position, time per token: the caption names them
    ax.legend()


def format_label(row: FormatRow) -> str:
    """A short name that tells every row of the formats table apart: engine and format."""
    engine = row.engine.replace("ONNX Runtime", "ORT")
    name = row.format.replace("GGUF ", "")
    for detail in (" (MatMulNBits)", " (MatMulNBits, builder)", " (builder)"):
        name = name.replace(detail, "")
    return f"{engine}: {name}"


def plot_formats(rows: list[FormatRow], size_ax: Axes, speed_ax: Axes) -> None:
    """Left: file size against perplexity, a marker per row (named in the legend); right: decode
    speed, a bar per row. Points of equal size and perplexity overlap, so names go in a legend."""
    colors = plt.get_cmap("tab20").colors  # one color per row (the default cycle has ten)
    for row, color in zip(rows, colors):
        marker = "o" if row.engine == "llama.cpp" else "s"
        mib = row.file_bytes / 2**20
        size_ax.scatter(mib, row.perplexity, marker=marker, color=color, label=format_label(row))
    size_ax.set(xlabel="MiB (log)", ylabel="PPL ↓", xscale="log")  # the caption names them
    size_ax.set_xticks([2, 4, 8, 13])
    size_ax.xaxis.set_major_formatter(ScalarFormatter())
    size_ax.xaxis.set_minor_formatter(NullFormatter())
    size_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    speed_ax.barh([format_label(r) for r in rows], [r.decode_tokens_per_s for r in rows])
    speed_ax.set(xlabel="token/s")
    speed_ax.tick_params(axis="y", labelsize=7)
    speed_ax.invert_yaxis()  # the table's order, top to bottom
