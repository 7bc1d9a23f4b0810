"""Figures for section 5.6."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes

from mldeploy.llm.generation import StepTimes


def plot_step_times(times: StepTimes, ax: Axes, mark: int = 256) -> None:
    """Milliseconds per generated token against its position, with and without the KV cache."""
    ax.plot(times.positions, np.array(times.uncached) * 1e3, label="no cache")
    ax.plot(times.positions, np.array(times.cached) * 1e3, label="KV cache")
    ax.axvline(mark, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("position")
    ax.set_ylabel("ms / token")
    ax.legend()
