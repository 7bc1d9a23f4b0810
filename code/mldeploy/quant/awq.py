"""AWQ, activation-aware weight quantization (Lin et al., 2024, arXiv:2306.00978), as the reference
implementation does it (mit-han-lab/llm-awq, ``awq/quantize/auto_scale.py`` and ``auto_clip.py``).

1. **Scale search**: ``y = W x = (W diag(s)) (diag(s)⁻¹ x)``. Scaling up the weight columns whose
   inputs are large, and those inputs down by the same factor, leaves the product unchanged but
   makes those columns lose less to rounding. ``s = mean|x|^α`` for ``α`` in
   ``{0, 1/20, …, 19/20}``, chosen by the mean squared error of the *block output* (here: the
   rest of the network) when only this layer is quantized.
2. **Clipping search**: after scaling, each group's weights are clamped to ``±max|w|·(1 − i/20)``,
   ``i < 10``, keeping per output row and group the bound with the smallest error of that group's
   contribution to the layer output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mldeploy.quant.fake_quant import QuantSpec, rtn

N_GRID = 20  # auto_scale.py: ratio = i / n_grid for i in range(20)
CLIP_GRID, MAX_SHRINK, CLIP_SAMPLES = (
    20,
    0.5,
    512,
)  # auto_clip.py: n_grid, max_shrink, n_sample_token


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """``get_act_scale``: mean absolute value of each input feature."""
    return x.abs().reshape(-1, x.shape[-1]).mean(0)


@torch.no_grad()
def search_scale(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    block: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-input scale ``s`` of weight ``w`` for inputs ``x``; ``block(x, weight)`` computes
    the block output with this layer's weight replaced. Returns ``(s, α, loss for each α)``."""
    original = block(x, w)
    x_max = activation_scale(x)
    best, history = (float("inf"), -1.0, None), []
    for i in range(N_GRID):
        ratio = i / N_GRID
        # ``pow(0.5)`` and ``sqrt`` would call MKL's sqrt, whose last bit depends on the CPU
        # (``mldeploy.reproducibility``): a tensor exponent and ``rsqrt`` round alike everywhere
        s = x_max.pow(torch.tensor(ratio)).clamp(min=1e-4)
        s = s * (s.max() * s.min()).rsqrt()  # only the ratios matter: centre the scales around 1
        w_hat = rtn(w * s, spec).dequantize() / s
        loss = (original - block(x, w_hat)).double().pow(2).mean().item()
        history.append(loss)
        if loss < best[0]:
            best = (loss, ratio, s)
    return best[2], best[1], history


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``auto_clip_layer``: the clamp bound (rows, groups) with the smallest error of each group's
    partial output ``x_g · w_g`` over ``CLIP_SAMPLES`` evenly spaced input rows.

    The error ``mean_t (x_tg · d_g)²`` of a weight change ``d_g`` equals ``d_gᵀ C_g d_g`` with the
    group's input Gram matrix ``C_g``; we use that form instead of materialising every output."""
    rows, cols = w.shape
    g = spec.group_size or cols
    x = x.reshape(-1, cols)
    x = x[0 :: max(1, len(x) // CLIP_SAMPLES)].double()
    xg = x.reshape(len(x), cols // g, g)
    gram = torch.einsum("tgi,tgj->gij", xg, xg) / len(x)  # (groups, g, g)
    wg = w.double().reshape(rows, cols // g, g)
    max_val = wg.abs().amax(dim=-1)  # (rows, groups)
    best_err = torch.full_like(max_val, float("inf"))
    best_max = max_val.clone()
    for i in range(int(MAX_SHRINK * CLIP_GRID)):
        bound = max_val * (1 - i / CLIP_GRID)
        clipped = torch.clamp(wg, -bound[..., None], bound[..., None])
        d = rtn(clipped.reshape(rows, cols), spec).dequantize().reshape(rows, cols // g, g) - wg
        err = torch.einsum("rgi,gij,rgj->rg", d, gram, d)
        better = err < best_err
        best_err[better], best_max[better] = err[better], bound[better]
    return best_max.to(w.dtype)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``apply_clip``: clamp each (row, group) of ``w`` to ``±max_val``."""
    rows, cols = w.shape
    groups = max_val.shape[1]
    wg = w.reshape(rows, groups, cols // groups)
    return torch.clamp(wg, -max_val[..., None], max_val[..., None]).reshape(rows, cols)
