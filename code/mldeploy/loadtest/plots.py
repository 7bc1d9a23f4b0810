"""The figure of section 5.2.7: batched against unbatched serving of the wide MLP."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from mldeploy.loadtest.loadgen import LoadResult


def batching_figure(results: dict[tuple[bool, int], LoadResult], clients: int = 16) -> plt.Figure:
    """Left: the latency CDF at ``clients`` concurrent clients; right: throughput against the
    number of clients. ``results`` maps (batched, clients) to a load test's result. Axes carry
    units and symbols only: the caption says what they measure, in both languages."""
    # 75 dpi: the PNG is the largest part of 5.2's page, which must stay under 1 MB
    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(8.4, 3.2), dpi=75)
    concurrency = sorted({c for _, c in results})
    for batched, style in ((True, "-"), (False, "--")):
        label = f"MLDEPLOY_BATCHING={int(batched)}"
        latencies = np.sort(results[batched, clients].latencies) * 1e3
        cdf.plot(latencies, np.linspace(0, 1, len(latencies)), style, label=label)
        throughput = [results[batched, c].throughput for c in concurrency]
        rate.plot(concurrency, throughput, style + "o", label=label)
    cdf.set(xscale="log", xlabel="ms", ylabel="CDF")
    cdf.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 10, 20, 50: plain numbers
    cdf.xaxis.set_major_formatter(ScalarFormatter())
    cdf.xaxis.set_minor_formatter(NullFormatter())
    rate.set(xscale="log", xlabel="c", ylabel="req/s")
    rate.set_xticks(concurrency, [str(c) for c in concurrency])
    for ax in (cdf, rate):
        ax.grid(alpha=0.3)
    # one legend for both panels, above them: inside, it would hide part of a curve
    fig.legend(*rate.get_legend_handles_labels(), loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig
