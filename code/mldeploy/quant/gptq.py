"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): quantize a Linear layer's weights one input
column at a time, pushing each column's rounding error onto the columns not yet quantized.

The error is weighted by the Hessian ``H = 2 XᵀX / n`` of the layer's squared output error, where
``X`` are the layer's inputs on calibration data; so the weights that matter for the *outputs*
are kept, not the weights themselves.
"""

from __future__ import annotations

import torch

from mldeploy.quant.fake_quant import (
    QuantizedWeight,
    QuantSpec,
    dequantize,
    minmax_params,
    quantize,
)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 XᵀX / n`` in float64 for inputs ``x`` of shape (n, in_features) or (…, in_features)."""
    x = x.reshape(-1, x.shape[-1]).double()  # a sequence model's (windows, positions, features)
    return 2.0 * x.T @ x / len(x)


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, block_size: int = 128, damp: float = 0.01
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) with GPTQ given the input Hessian ``h`` (in, in).

    Follows the reference ``GPTQ.fasterquant`` (IST-DASLab/gptq, act-order off) step for step, in
    float64: a group's range comes from the *whole* group (any group size, smaller or larger than
    the block) as the columns stand when the group starts, before the current block's updates.
    """
    rows, cols = w.shape
    g = spec.group_size or cols
    spec.groups(cols)  # the row must split into whole groups
    W = w.detach().double().clone()
    H = h.double().clone()
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // g, dtype=W.dtype)
    zeros = torch.zeros_like(scales)
    if spec.group_size is None:  # per channel: the range of the whole row, before anything changes
        scales[:, 0], zeros[:, 0] = minmax_params(W, spec.bits)
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # Damping: add a small multiple of the mean diagonal so that H is safely positive definite.
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    # Upper Cholesky factor of H⁻¹: its row i holds the error-feedback weights for column i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    for b1 in range(0, cols, block_size):  # lazy batches: update the rest of W once per block
        b2 = min(b1 + block_size, cols)
        W1, Hinv1 = W[:, b1:b2].clone(), Hinv[b1:b2, b1:b2]
        err1 = torch.zeros_like(W1)
        for i in range(b2 - b1):
            col = b1 + i
            if spec.group_size is not None and col % g == 0:  # a new group starts: its range
                scales[:, col // g], zeros[:, col // g] = minmax_params(
                    W[:, col : col + g], spec.bits
                )
            s, z = scales[:, col // g], zeros[:, col // g]
            q = quantize(W1[:, i], s, z, spec.bits)
            codes[:, col] = q
            err = (W1[:, i] - dequantize(q, s, z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # feed the error to later columns
            err1[:, i] = err
        W[:, b2:] -= err1 @ Hinv[b1:b2, b2:]  # the deferred update of all columns after the block
    dtype = w.dtype
    return QuantizedWeight(codes.to(dtype), scales.to(dtype), zeros.to(dtype), spec)
