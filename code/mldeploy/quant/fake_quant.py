"""Uniform affine quantization of weights: round-to-nearest (RTN), per-channel or group-wise, and
fake quantization with a straight-through gradient for quantization-aware training (QAT).

A weight row (one output channel) is cut into groups of ``group_size`` inputs (the whole row when
``group_size`` is ``None``: per-channel). Each group gets its own scale ``s`` and zero point ``z``
from its min and max, and integer codes ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """Bit width and group size (``None``: one scale per output channel)."""

    bits: int = 4
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups per row; the row length must be a multiple of the group size."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(f"{in_features} inputs do not split into groups of {self.group_size}")
        return in_features // self.group_size

    def label(self) -> str:
        return f"{self.bits}-bit " + (
            "per-channel" if self.group_size is None else f"g{self.group_size}"
        )


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (shape (rows, n)) from the row's min and max.

    The range always contains 0, so that exact zeros stay exact. An all-zero row gets the range
    [-1, 1], as in the GPTQ reference's quantizer (IST-DASLab/gptq ``quant.py``), so that both give
    the same codes.
    """
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / s) + z, 0, 2**bits - 1)``; ``scale``, ``zero`` broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Back to real values: ``(q - z) · s``."""
    return (q - zero) * scale


@dataclass
class QuantizedWeight:
    """Codes (rows, cols) and per-group scale and zero point (rows, groups) of one weight matrix."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        g = self.scale.shape[1]
        q = self.codes.reshape(rows, g, cols // g)
        return dequantize(q, self.scale[..., None], self.zero[..., None]).reshape(rows, cols)

    def rounding_ties(self, w: torch.Tensor, atol: float = 2e-6) -> torch.Tensor:
        """Where ``w / s`` lies half-way between two integers (within ``atol``): there the code
        depends on how the division and the rounding are done (``round(w / s) + z``, or
        ``round(w · (1/s) + z)`` in float32 as ONNX Runtime does), and either code is right."""
        rows, cols = self.codes.shape
        g = self.scale.shape[1]
        ratio = (w.detach().reshape(rows, g, cols // g) / self.scale[..., None]).reshape(rows, cols)
        return (ratio - ratio.floor() - 0.5).abs() < atol


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest: min-max scale per group, then round every weight independently."""
    rows, cols = w.shape
    g = spec.groups(cols)
    blocks = w.detach().reshape(rows * g, cols // g)
    scale, zero = minmax_params(blocks, spec.bits)
    codes = quantize(blocks, scale[:, None], zero[:, None], spec.bits)
    return QuantizedWeight(
        codes.reshape(rows, cols), scale.reshape(rows, g), zero.reshape(rows, g), spec
    )


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward: the straight-through estimator (STE)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize in one step, staying in float: ``(clamp(round(w/s) + z) - z) · s``.

    The forward pass sees the rounded weights; the gradient flows straight through the rounding
    (and is zero where the clamp is active), so training can adapt the float weights to the grid.
    """
    rows, cols = w.shape
    g = spec.groups(cols)
    blocks = w.reshape(rows * g, cols // g)
    scale, zero = minmax_params(blocks.detach(), spec.bits)
    scale, zero = scale[:, None], zero[:, None]
    q = torch.clamp(round_ste(blocks / scale) + zero, 0, spec.qmax)
    return ((q - zero) * scale).reshape(rows, cols)


def packed_bytes(n_weights: int, spec: QuantSpec, rows: int) -> int:
    """Bytes for ``n_weights`` bit-packed codes, plus a float32 scale and uint8 zero per group."""
    cols = n_weights // rows
    groups = rows * spec.groups(cols)
    return (n_weights * spec.bits + 7) // 8 + groups * 5
