"""A transcription of the GPTQ reference implementation, to check the course's ``gptq_quantize``.

Source: IST-DASLab/gptq, ``gptq.py`` (``GPTQ.fasterquant``, ``actorder=False``,
``static_groups=False``) and ``quant.py`` (``Quantizer.find_params`` with ``perchannel=True,
sym=False, mse=False``, and ``quantize``), as of commit 2d65066 ("Update README.md").

Transcribed line by line; the only changes are the ones a test needs: the weight and Hessian come
in as arguments instead of from a layer and its hooks, the arithmetic stays in the dtype given
(the test passes float64, as the library uses), no CUDA synchronisation or timing, and the integer
codes are recorded next to the dequantized weights. This module lives in ``tests/`` on purpose:
it is the yardstick, not part of the library.
"""

from __future__ import annotations

import torch


def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class Quantizer:
    """``quant.Quantizer`` for weights, per channel, asymmetric, min-max (``mse=False``)."""

    def __init__(self, bits: int):
        self.maxq = torch.tensor(2**bits - 1)
        self.scale = torch.zeros(1)

    def find_params(self, x):
        tmp = torch.zeros(x.shape[0], dtype=x.dtype)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        self.zero = torch.round(-xmin / self.scale)
        self.scale = self.scale.reshape(-1, 1)
        self.zero = self.zero.reshape(-1, 1)

    def ready(self):
        return torch.all(self.scale != 0)


def fasterquant(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
    groupsize: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GPTQ.fasterquant``: returns the quantized weight ``Q`` and its integer codes."""
    quantizer = Quantizer(bits)
    W = weight.clone()
    columns = W.shape[1]

    if not quantizer.ready():
        quantizer.find_params(W)

    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if groupsize != -1:
                if (i1 + i) % groupsize == 0:
                    quantizer.find_params(W[:, (i1 + i) : (i1 + i + groupsize)])

            q = quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            codes[:, i1 + i] = torch.clamp(
                torch.round(w.unsqueeze(1) / quantizer.scale) + quantizer.zero, 0, quantizer.maxq
            ).flatten()

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return Q, codes
