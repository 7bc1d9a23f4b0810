"""Weight-only quantization of a whole model, layer after layer: RTN, GPTQ or AWQ on every Linear.

GPTQ and AWQ see each layer's inputs as the *already quantized* earlier layers produce them, as
in the GPTQ paper, so a later layer can compensate for what the earlier ones lost.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from mldeploy.quant.awq import awq_search
from mldeploy.quant.charlm import CharMLP
from mldeploy.quant.fake_quant import QuantizedWeight, QuantSpec, rtn
from mldeploy.quant.gptq import gptq_quantize, hessian
from mldeploy.quant.metrics import output_error
from mldeploy.reproducibility import single_thread

METHODS = ("rtn", "gptq", "awq")
AWQ_ROWS = 2048


@torch.no_grad()
def layer_inputs(model: CharMLP, x: np.ndarray, batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """The input of every Linear layer of ``model`` for the windows ``x`` (captured by forward hooks)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in model.linears()}
    hooks = [
        layer.register_forward_hook(
            lambda _m, inp, _out, name=name: seen[name].append(inp[0].detach())
        )
        for name, layer in model.linears().items()
    ]
    try:
        xs = torch.from_numpy(np.asarray(x, dtype=np.int64))
        for i in range(0, len(xs), batch_size):
            model(xs[i : i + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


@torch.no_grad()
def quantize_model(
    model: CharMLP, spec: QuantSpec, method: str = "rtn", calibration: np.ndarray | None = None
) -> tuple[CharMLP, dict[str, QuantizedWeight]]:
    """A copy of ``model`` whose Linear weights are replaced by their quantized values.

    Also returns the codes and scales of each layer (for packing into an INT4 file); AWQ's scaled
    weights have no plain codes, so that dictionary is empty for it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "rtn" and calibration is None:
        raise ValueError(f"{method} needs calibration windows")
    quantized = copy.deepcopy(model).eval()
    packed: dict[str, QuantizedWeight] = {}
    with single_thread():
        for name, layer in quantized.linears().items():
            w = layer.weight.data
            if method == "rtn":
                packed[name] = rtn(w, spec)
                layer.weight.data = packed[name].dequantize()
                continue
            x = layer_inputs(quantized, calibration)[
                name
            ]  # inputs after the earlier layers' quantization
            if method == "gptq":
                packed[name] = gptq_quantize(w, hessian(x), spec)
                layer.weight.data = packed[name].dequantize()
            else:  # the scale search needs far fewer rows than GPTQ's Hessian
                layer.weight.data = awq_search(w, x[:AWQ_ROWS], spec)[2]
    return quantized, packed


def layer_errors(model: CharMLP, quantized: nn.Module, x: np.ndarray) -> dict[str, float]:
    """Relative output error of every Linear layer on the FP32 model's own inputs for windows ``x``."""
    inputs = layer_inputs(model, x)
    layers_q = dict(quantized.named_modules())
    return {
        name: output_error(inputs[name], layer.weight, layers_q[name].weight)
        for name, layer in model.linears().items()
    }
