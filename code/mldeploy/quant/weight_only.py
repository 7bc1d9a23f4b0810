"""Weight-only quantization of a whole model, layer after layer: RTN, GPTQ or AWQ on every Linear.

GPTQ sees each layer's inputs as the *already quantized* earlier layers produce them, as in the
GPTQ paper, so a later layer can compensate for what the earlier ones lost. AWQ, like its
reference implementation, searches every layer on the full-precision model's inputs and
quantizes afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mldeploy.quant import awq
from mldeploy.quant.charlm import CharMLP
from mldeploy.quant.fake_quant import QuantizedWeight, QuantSpec, rtn
from mldeploy.quant.gptq import gptq_quantize, hessian
from mldeploy.quant.metrics import output_error
from mldeploy.reproducibility import single_thread

METHODS = ("rtn", "gptq", "awq")
AWQ_ROWS = 2048


@torch.no_grad()
def layer_inputs(model: CharMLP, x: np.ndarray, batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """The input of each Linear layer of ``model`` for windows ``x`` (captured by forward hooks)."""
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

    Also returns the codes and scales of each layer (for packing into an INT4 file); AWQ's codes
    belong to a model with its scales folded in (see :func:`awq_model`), so that dictionary is
    empty for it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "rtn" and calibration is None:
        raise ValueError(f"{method} needs calibration windows")
    if method == "awq":
        return awq_model(model, spec, calibration).quantized, {}
    quantized = copy.deepcopy(model).eval()
    packed: dict[str, QuantizedWeight] = {}
    with single_thread():
        for name, layer in quantized.linears().items():
            w = layer.weight.data
            if method == "rtn":
                packed[name] = rtn(w, spec)
            else:  # the inputs as the earlier, already quantized layers produce them
                x = layer_inputs(quantized, calibration)[name]
                packed[name] = gptq_quantize(w, hessian(x), spec)
            layer.weight.data = packed[name].dequantize()
    return quantized, packed


def downstream(model: CharMLP, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``block(x, w)``: the logits when layer ``name`` with weight ``w`` gets input ``x`` and the
    rest of the network runs unchanged (AWQ's block output)."""
    layers = list(model.linears().items())
    k = [n for n, _ in layers].index(name)

    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, w, layers[k][1].bias)
        for _, layer in layers[k + 1 :]:
            h = layer(F.relu(h))
        return h

    return block


@dataclass
class AWQModel:
    """AWQ applied to a whole model.

    ``folded``: the FP model with the scales folded in and the weights clipped; ``codes``: its
    quantized Linear weights; ``input_scale``: the scale of fc1, whose inputs must be divided by it
    at run time; ``quantized``: the same function as plain weights of the original model;
    ``alphas``: the chosen exponent of each layer."""

    quantized: CharMLP
    folded: CharMLP
    codes: dict[str, QuantizedWeight]
    input_scale: torch.Tensor
    alphas: dict[str, float]


@torch.no_grad()
def awq_model(
    model: CharMLP, spec: QuantSpec, calibration: np.ndarray, *, clip: bool = True
) -> AWQModel:
    """Search AWQ scales (on the block output) and clipping for every Linear, fold, then round.

    The scales of fc2 and head fold into the rows and bias of the layer before (``scale_fc_fc``:
    ``relu(z)/s = relu(z/s)`` for ``s > 0``); fc1's inputs are embedding vectors from one table
    shared by 32 positions, so its scale stays an explicit division of the input. ``clip=False``
    skips the clipping search (scales only)."""
    with single_thread():
        inputs = layer_inputs(model, calibration[:AWQ_ROWS])
        names = list(model.linears())
        scales, alphas = {}, {}
        for name, layer in model.linears().items():
            s, alpha, _ = awq.search_scale(
                layer.weight, inputs[name], spec, downstream(model, name)
            )
            scales[name], alphas[name] = s, alpha
        folded = copy.deepcopy(model).eval()
        layers = folded.linears()
        for k, name in enumerate(names):
            layers[name].weight.mul_(scales[name][None, :])
            if k > 0:
                layers[names[k - 1]].weight.div_(scales[name][:, None])
                layers[names[k - 1]].bias.div_(scales[name])
        codes = {}
        for name in names:
            w = layers[name].weight.data
            if clip:
                max_val = awq.search_clip(w, inputs[name] / scales[name], spec)
                layers[name].weight.data = awq.apply_clip(w, max_val)
            codes[name] = rtn(layers[name].weight.data, spec)
        quantized = copy.deepcopy(model).eval()
        for k, (name, layer) in enumerate(quantized.linears().items()):
            w = codes[name].dequantize() / scales[name][None, :]
            if k + 1 < len(names):  # undo the row scaling folded in for the next layer
                w = w * scales[names[k + 1]][:, None]
            layer.weight.data = w
    return AWQModel(quantized, folded, codes, scales[names[0]], alphas)


def layer_errors(model: CharMLP, quantized: nn.Module, x: np.ndarray) -> dict[str, float]:
    """Relative output error of every Linear layer on the FP32 model's own inputs for windows
    ``x``."""
    inputs = layer_inputs(model, x)
    layers_q = dict(quantized.named_modules())
    return {
        name: output_error(inputs[name], layer.weight, layers_q[name].weight)
        for name, layer in model.linears().items()
    }
