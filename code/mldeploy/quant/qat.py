"""Quantization-aware training (QAT): fine-tune with fake-quantized weights, so that the float
weights settle where rounding hurts least; then keep only the integer codes.

The fake quantizer is attached with ``torch.nn.utils.parametrize``: ``layer.weight`` then *is*
``fake_quantize(original)`` in every forward pass, and the optimizer updates ``original``.
"""

from __future__ import annotations

import copy
import time

import numpy as np
from torch import nn
from torch.nn.utils import parametrize

from mldeploy.quant.charlm import CharMLP, fit
from mldeploy.quant.fake_quant import QuantizedWeight, QuantSpec, fake_quantize, rtn
from mldeploy.reproducibility import single_thread


class FakeQuant(nn.Module):
    """Parametrization that fake-quantizes a weight on every use (straight-through gradient)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w):
        return fake_quantize(w, self.spec)


def prepare_qat(model: CharMLP, spec: QuantSpec) -> CharMLP:
    """A copy of ``model`` whose Linear weights are fake-quantized in every forward pass."""
    qat = copy.deepcopy(model)
    for layer in qat.linears().values():
        parametrize.register_parametrization(layer, "weight", FakeQuant(spec))
    return qat


def convert_qat(qat: CharMLP) -> tuple[CharMLP, dict[str, QuantizedWeight]]:
    """Freeze a QAT model: codes and scales of each layer (exactly the grid the training used),
    and a plain model whose weights are the dequantized codes."""
    plain = copy.deepcopy(qat)
    codes: dict[str, QuantizedWeight] = {}
    for name, layer in plain.linears().items():
        spec = layer.parametrizations.weight[0].spec
        original = layer.parametrizations.weight.original.detach()
        codes[name] = rtn(original, spec)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        layer.weight.data = codes[name].dequantize()
    return plain.eval(), codes


def qat_finetune(
    model: CharMLP, ids: np.ndarray, spec: QuantSpec, *, steps: int, lr: float = 1e-3, seed: int = 1
) -> tuple[CharMLP, dict[str, QuantizedWeight]]:
    """Fine-tune a fake-quantized copy of ``model`` for ``steps`` steps, then convert it."""
    qat = prepare_qat(model, spec)
    with single_thread():
        fit(qat, ids, steps=steps, lr=lr, seed=seed)
    return convert_qat(qat)


def float_finetune(
    model: CharMLP, ids: np.ndarray, *, steps: int, lr: float = 1e-3, seed: int = 1
) -> CharMLP:
    """The PTQ side of a fair comparison: same steps, data and learning rate, no fake-quantizing."""
    tuned = copy.deepcopy(model)
    with single_thread():
        fit(tuned, ids, steps=steps, lr=lr, seed=seed)
    return tuned


def qat_vs_ptq(
    bench, spec: QuantSpec, *, steps: int, seeds: tuple[int, ...]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Held-out perplexity per seed of: the FP32 model fine-tuned ``steps`` more steps, PTQ (RTN and
    GPTQ) of that fine-tuned model, and QAT with the same steps, data order and learning rate; and
    the mean seconds of one FP32 fine-tuning and of one QAT run."""
    from mldeploy.quant import benchmark, weight_only  # benchmark imports this module's users

    runs: dict[str, list[float]] = {"FP32 fine-tuned": [], "PTQ RTN": [], "PTQ GPTQ": [], "QAT": []}
    seconds = {"FP32 fine-tuning": 0.0, "QAT": 0.0}
    for seed in seeds:
        start = time.perf_counter()
        tuned = float_finetune(bench.model, bench.corpus.train, steps=steps, seed=seed)
        seconds["FP32 fine-tuning"] += (time.perf_counter() - start) / len(seeds)
        runs["FP32 fine-tuned"].append(benchmark.torch_point(bench, "", "", tuned, 1).perplexity)
        for method, label in (("rtn", "PTQ RTN"), ("gptq", "PTQ GPTQ")):
            model_q, _ = weight_only.quantize_model(tuned, spec, method, bench.calibration)
            runs[label].append(benchmark.torch_point(bench, "", "", model_q, 1).perplexity)
        start = time.perf_counter()
        qat_model, _ = qat_finetune(bench.model, bench.corpus.train, spec, steps=steps, seed=seed)
        seconds["QAT"] += (time.perf_counter() - start) / len(seeds)
        runs["QAT"].append(benchmark.torch_point(bench, "", "", qat_model, 1).perplexity)
    return runs, seconds
