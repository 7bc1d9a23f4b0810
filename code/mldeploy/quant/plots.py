"""Figures of section 5.3: the accuracy–size plane, perplexity against bits per weight, the
calibration-size curves and the layout of a GGUF k-quant super-block."""

from __future__ import annotations

import matplotlib.axes
import numpy as np
from matplotlib.patches import Rectangle

from mldeploy.quant.benchmark import BitsPoint, Point

_STYLE = {
    "FP32": ("k", "*"),
    "INT8": ("C0", "s"),
    "RTN": ("C1", "o"),
    "GPTQ": ("C2", "D"),
    "QAT": ("C3", "^"),
    "AWQ": ("C4", "v"),
    "GGUF": ("C5", "P"),
}
# Candidate label positions around a point (offset in points, horizontal alignment), tried in order.
_CANDIDATES = [
    ((0, 8), "center"),
    ((0, -13), "center"),
    ((7, -3), "left"),
    ((-7, -3), "right"),
    ((0, 17), "center"),
    ((0, -22), "center"),
    ((7, 8), "left"),
    ((-7, -13), "right"),
]


def _place_labels(ax: matplotlib.axes.Axes, items: list[tuple[float, float, str, str]]) -> None:
    """Annotate points without overlaps: each label takes the first candidate position whose box
    (estimated from the text length) meets no earlier label and no point."""
    fig = ax.figure
    fig.canvas.draw()
    px_per_pt = fig.dpi / 72
    points = [ax.transData.transform((x, y)) for x, y, _, _ in items]
    taken: list[tuple[float, float, float, float]] = [
        (px - 4, py - 4, px + 4, py + 4) for px, py in points
    ]
    for (x, y, text, color), (px, py) in zip(items, points):
        w, h = 0.55 * 7 * len(text) * px_per_pt, 8 * px_per_pt
        choice = _CANDIDATES[0]
        for (dx, dy), ha in _CANDIDATES:
            cx, cy = px + dx * px_per_pt, py + dy * px_per_pt
            left = cx - w / 2 if ha == "center" else cx if ha == "left" else cx - w
            box = (left, cy, left + w, cy + h)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in taken):
                choice = ((dx, dy), ha)
                taken.append(box)
                break
        (dx, dy), ha = choice
        ax.annotate(
            text,
            (x, y),
            fontsize=7,
            color=color,
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
        )


def plot_curve(points: list[Point], ax: matplotlib.axes.Axes) -> None:
    """Accuracy–size plane: one colour and line per method, hollow markers for estimated sizes."""
    families: dict[str, list[Point]] = {}
    labels: list[tuple[float, float, str, str]] = []
    for p in points:
        families.setdefault(p.family.split()[0], []).append(p)
    for family, members in families.items():
        color, marker = _STYLE[family]
        members = sorted(members, key=lambda p: p.bytes)
        if family in ("RTN", "GPTQ", "QAT", "AWQ", "GGUF"):
            ax.plot(
                [p.bytes / 1024 for p in members],
                [p.perplexity for p in members],
                color=color,
                lw=1,
                alpha=0.6,
            )
        for p in members:
            face = color if p.on_disk else "white"
            ax.scatter(
                p.bytes / 1024,
                p.perplexity,
                marker=marker,
                s=55,
                color=face,
                edgecolors=color,
                zorder=3,
            )
            tag = p.name.split(" ", 1)[1] if family != "FP32" and " " in p.name else p.name
            labels.append((p.bytes / 1024, p.perplexity, tag.replace(" (ORT)", ""), color))
        ax.scatter([], [], marker=marker, color=color, label=family)
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.08)
    # units and symbols only: the caption says what they measure, in both languages
    ax.set_xlabel("KiB (log)")
    ax.set_ylabel("PPL ↓")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    _place_labels(ax, labels)


def plot_bits(points: list[BitsPoint], fp32_perplexity: float, ax: matplotlib.axes.Axes) -> None:
    """Perplexity against bits per weight, one line per method; the FP32 model as a dashed line."""
    methods: dict[str, list[BitsPoint]] = {}
    for p in points:
        methods.setdefault(p.method, []).append(p)
    for method, members in methods.items():
        color, marker = _STYLE[method]
        members = sorted(members, key=lambda p: p.bits_per_weight)
        ax.plot(
            [p.bits_per_weight for p in members],
            [p.perplexity for p in members],
            color=color,
            marker=marker,
            lw=1,
            label=method,
        )
        if method == "GGUF":
            _place_labels(ax, [(p.bits_per_weight, p.perplexity, p.label, color) for p in members])
    ax.axhline(fp32_perplexity, color="k", ls="--", lw=1, label="FP32")
    ax.set_xlabel("bit / w")
    ax.set_ylabel("PPL")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot_calibration(
    rows: list[tuple[int, dict[str, float], float]], axes: tuple[matplotlib.axes.Axes, ...]
) -> None:
    """Left: GPTQ held-out error per layer against calibration windows; right: static INT8
    perplexity."""
    n = [r[0] for r in rows]
    for name in rows[0][1]:
        axes[0].plot(n, [r[1][name] for r in rows], marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("GPTQ 4 bit: ‖ΔY‖² / ‖Y‖²")
    axes[0].legend(fontsize=8)
    axes[1].plot(n, [r[2] for r in rows], marker="s", color="C0")
    axes[1].set_ylabel("INT8 PPL")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n")
        ax.grid(True, which="both", alpha=0.3)


def plot_superblock(
    w: np.ndarray, w_hat: np.ndarray, sub: int, axes: tuple[matplotlib.axes.Axes, ...]
) -> None:
    """Left: the fields of one ``Q4_K`` super-block; right: its 256 weights and their decoded
    values, one step size per sub-block of ``sub`` weights."""
    ax = axes[0]
    fields = [
        ("d\nFP16", 2, "C3"),
        ("dmin\nFP16", 2, "C3"),
        ("8×(s,m)\n6 bit", 12, "C1"),
        ("256 × q\n4 bit", 128, "C0"),
    ]
    x = 0.0
    for label, nbytes, color in fields:
        width = max(nbytes, 22)  # tiny fields drawn wider so their names fit; bytes in the label
        ax.add_patch(Rectangle((x, 0), width, 1, color=color, alpha=0.35))
        ax.text(x + width / 2, 0.5, f"{label}\n{nbytes} B", ha="center", va="center", fontsize=7)
        x += width
    ax.set_xlim(0, x)
    ax.set_ylim(-0.2, 1.2)
    ax.axis("off")
    ax.set_title("block_q4_K: 144 B / 256 w = 4.5 bit / w", fontsize=9)
    ax = axes[1]
    ax.plot(w, ".", ms=3, color="0.5", label="w (FP32)")
    ax.plot(w_hat, "_", ms=5, color="C0", label="ŵ (Q4_K)")
    for k in range(sub, len(w), sub):
        ax.axvline(k - 0.5, color="C1", lw=0.6, alpha=0.6)
    ax.set_xlabel("i")
    ax.set_ylabel("w")
    ax.legend(fontsize=7)
