"""AWQ-style activation-aware scaling (Lin et al., 2023, arXiv:2306.00978): before rounding,
scale up the weight columns whose inputs are large, and scale those inputs down by the same factor.

``y = W x = (W diag(s)) (diag(s)⁻¹ x)``: the product is unchanged, but the columns that see large
activations lose less to rounding. ``s = mean|x|^α``, with ``α`` searched on calibration data.
"""

from __future__ import annotations

import torch

from mldeploy.quant.fake_quant import QuantSpec, rtn
from mldeploy.quant.metrics import output_error


def awq_search(
    w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int = 10
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Best per-input-column scale ``s`` over ``α ∈ {0, 1/grid, …, 1}`` for the layer output error;
    returns ``(s, α, Ŵ)`` where ``Ŵ = Q(W diag(s)) diag(s)⁻¹`` is the effective quantized weight."""
    w = w.detach()
    activation = x.detach().abs().mean(dim=0).clamp(min=1e-8)
    best = (float("inf"), 0.0, torch.ones_like(activation), w)
    for step in range(grid + 1):
        alpha = step / grid
        s = activation**alpha
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (only ratios matter)
        w_hat = rtn(w * s, spec).dequantize() / s
        err = output_error(x, w, w_hat)
        if err < best[0]:
            best = (err, alpha, s, w_hat)
    return best[2], best[1], best[3]
