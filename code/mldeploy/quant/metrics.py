"""How far a quantized layer is from the original: the error measures the chapter compares."""

from __future__ import annotations

import torch


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative squared error of a layer's outputs: ‖X Ŵᵀ − X Wᵀ‖² / ‖X Wᵀ‖²."""
    x, w, w_hat = x.detach().double(), w.detach().double(), w_hat.detach().double()
    ref = x @ w.T
    return float(((x @ w_hat.T - ref) ** 2).sum() / (ref**2).sum())
