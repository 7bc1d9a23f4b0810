"""Figures of section 5.3: the accuracy–size plane with one colour and marker per method."""

from __future__ import annotations

import matplotlib.axes

from mldeploy.quant.benchmark import Point

_STYLE = {
    "FP32": ("k", "*"),
    "INT8": ("C0", "s"),
    "RTN": ("C1", "o"),
    "GPTQ": ("C2", "D"),
    "QAT": ("C3", "^"),
    "AWQ": ("C4", "v"),
}
_LABEL_OFFSET = {
    "FP32": (-6, 8),
    "INT8": (0, 9),
    "RTN": (0, 9),
    "GPTQ": (0, -13),
    "QAT": (-8, -13),
    "AWQ": (0, -13),
}


def plot_curve(points: list[Point], ax: matplotlib.axes.Axes) -> None:
    """Accuracy–size plane: one colour and line per method, hollow markers for estimated sizes."""
    families: dict[str, list[Point]] = {}
    for p in points:
        families.setdefault(p.family.split()[0], []).append(p)
    for family, members in families.items():
        color, marker = _STYLE[family]
        members = sorted(members, key=lambda p: p.bytes)
        if family in ("RTN", "GPTQ", "QAT"):
            ax.plot(
                [p.bytes / 1024 for p in members],
                [p.perplexity for p in members],
                color=color,
                lw=1,
                alpha=0.6,
            )
        for i, p in enumerate(members):
            face = color if p.on_disk else "white"
            offset = (
                _LABEL_OFFSET[family] if family != "INT8" or i % 2 == 0 else (0, -13)
            )  # INT8 pair overlaps
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
            ax.annotate(
                tag.replace(" (ORT)", ""),
                (p.bytes / 1024, p.perplexity),
                fontsize=7,
                color=color,
                xytext=offset,
                textcoords="offset points",
                ha="center",
            )
        ax.scatter([], [], marker=marker, color=color, label=family)
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel("model file size (KiB, log scale; hollow = estimated packed size)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
