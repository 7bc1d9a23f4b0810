"""INT4 weights for the Llama with 5.3's own quantizers (RTN, GPTQ, AWQ), written as MatMulNBits.

The seven projections of every block (q, k, v, o, gate, up, down: 92 % of the weights) are
quantized in groups of ``GROUP_SIZE`` inputs. The embedding table and ``lm_head`` stay FP32, as in
the GPTQ and AWQ papers' own runs: the embedding is a table lookup (``Gather``), not a matrix
product, and the output layer sets every logit directly, so its error is not averaged away by any
later layer. Calibration uses windows of the training text only; perplexity is measured on the
held-out text.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mldeploy.llm import evaluation, onnx_export, tokenizer
from mldeploy.llm.model import Llama
from mldeploy.quant import awq, cache, fake_quant, gptq, int4_onnx, weight_only
from mldeploy.quant.fake_quant import QuantizedWeight, QuantSpec, rtn
from mldeploy.reproducibility import single_thread

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 32  # ONNX Runtime GenAI's default block size: the two INT4 files are comparable
N_CALIBRATION = 32  # windows of evaluation.SEQ_LEN training tokens (4,096 tokens)
AWQ_WINDOWS = weight_only.AWQ_ROWS // evaluation.SEQ_LEN  # AWQ searches on 2,048 tokens, as in 5.3
METHODS = weight_only.METHODS


class Projections(nn.Module):
    """The Llama as 5.3's whole-model quantizers see a model: a forward and ``linears()``."""

    def __init__(self, net: Llama) -> None:
        super().__init__()
        self.net = net

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def linears(self) -> dict[str, nn.Linear]:
        """The block projections, in the order data flows through them (lm_head excluded)."""
        return {
            name: m
            for name, m in self.net.named_modules()
            if name.rsplit(".", 1)[-1] in PROJECTIONS
        }


def calibration_windows(ids: list[int], n: int = N_CALIBRATION) -> np.ndarray:
    """``n`` windows of ``SEQ_LEN`` tokens spread evenly over the training tokens ``ids``."""
    starts = np.linspace(0, len(ids) - evaluation.SEQ_LEN, n).astype(int)
    return np.stack([np.asarray(ids[s : s + evaluation.SEQ_LEN], dtype=np.int64) for s in starts])


@dataclass
class Quantized:
    """``model``: the dequantized weights in PyTorch; ``codes``: the INT4 codes of ``base``'s
    projections (``base`` is the FP model, or for AWQ the model with its scales folded in)."""

    model: Llama
    base: Llama
    codes: dict[str, QuantizedWeight]


def quantize(
    net: Llama, method: str, calibration: np.ndarray, spec: QuantSpec | None = None
) -> Quantized:
    """RTN or GPTQ through 5.3's ``weight_only.quantize_model``; AWQ through :func:`awq_llama`."""
    spec = spec or QuantSpec(4, GROUP_SIZE)
    if method == "awq":
        return awq_llama(net, spec, calibration)
    wrapped, codes = weight_only.quantize_model(Projections(net), spec, method, calibration)
    return Quantized(wrapped.net, net, codes)


@torch.no_grad()
def _input_of(net: Llama, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """What ``layer`` receives when ``net`` runs on the windows ``x``."""
    seen = []
    hook = layer.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    try:
        net(x)
    finally:
        hook.remove()
    return seen[0]


def _search(layers: list[nn.Linear], x: torch.Tensor, spec: QuantSpec, block) -> torch.Tensor:
    """One AWQ scale shared by ``layers`` (same input ``x``), judged on ``block``'s output;
    ``block(x, {layer: weight})`` runs the block with those weights replaced."""
    sizes = [layer.out_features for layer in layers]
    w = torch.cat([layer.weight for layer in layers])  # rows of all layers: one weight to scale

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return block(x, dict(zip(layers, w.split(sizes))))

    return awq.search_scale(w, x, spec, run)[0]


@torch.no_grad()
def awq_llama(net: Llama, spec: QuantSpec, calibration: np.ndarray) -> Quantized:
    """AWQ as llm-awq applies it to Llama blocks: scale search, folding, clip search, rounding.

    q/k/v share one scale folded into ``input_layernorm``; gate/up one folded into
    ``post_attention_layernorm``; down's is folded into up's rows. o_proj gets no scale: with
    GQA, v has fewer rows than o has inputs, which llm-awq also skips. Clipping is searched for
    every projection except q and k, whose error the softmax reshapes (llm-awq skips them too).
    """
    folded = copy.deepcopy(net).eval()
    x = torch.from_numpy(np.asarray(calibration[:AWQ_WINDOWS], dtype=np.int64))
    cos, sin = folded.rope_cos[: x.shape[1]], folded.rope_sin[: x.shape[1]]
    with single_thread():
        for block in folded.model.layers:
            attn, mlp = block.self_attn, block.mlp
            groups = [
                (block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], attn,
                 lambda h, m, p: functional_call(m, p, (h, cos, sin, None))),
                (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp,
                 lambda h, m, p: functional_call(m, p, (h,))),
            ]  # fmt: skip
            for norm, layers, module, call in groups:
                names = {layer: n for n, layer in module.named_modules() if layer in layers}

                def block_out(h, ws, module=module, call=call, names=names):
                    return call(h, module, {f"{names[m]}.weight": w for m, w in ws.items()})

                s = _search(layers, _input_of(folded, x, layers[0]), spec, block_out)
                norm.weight.div_(s)
                for layer in layers:
                    layer.weight.mul_(s[None, :])
            h = _input_of(folded, x, mlp.down_proj)
            s = _search([mlp.down_proj], h, spec, lambda h, ws: F.linear(h, *ws.values()))
            mlp.up_proj.weight.div_(s[:, None])
            mlp.down_proj.weight.mul_(s[None, :])
            for layer in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                max_val = awq.search_clip(layer.weight, _input_of(folded, x, layer), spec)
                layer.weight.data = awq.apply_clip(layer.weight, max_val)
    codes = {name: rtn(m.weight, spec) for name, m in Projections(folded).linears().items()}
    model = copy.deepcopy(folded)
    for name, m in Projections(model).linears().items():
        m.weight.data = codes[name].dequantize()
    return Quantized(model, folded, codes)


# --- files, measurements and the format table ----------------------------------------------------


def bits_per_weight(path: str | Path) -> float:
    """File bits per weight of the MatMulNBits matrices (codes, scales and zero points); 32.0
    for a file without them."""
    proto = onnx.load(str(path))
    sizes = {
        t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        for t in proto.graph.initializer
    }
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return 32.0
    stored = sum(sizes.get(name, 0) for n in nodes for name in n.input[1:4])
    weights = sum(_attr(n, "K") * _attr(n, "N") for n in nodes)
    return 8 * stored / weights


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def file_bytes(path: str | Path) -> int:
    """Bytes of an ONNX file plus its external-data file, if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def folder(trained) -> Path:
    """``artifacts/5.6/<model folder>/onnx-<source digest>``: files keyed on model and code."""
    modules = (onnx_export, fake_quant, gptq, awq, weight_only, int4_onnx, sys.modules[__name__])
    return Path(trained.folder) / f"onnx-{cache.source_digest(*modules)}"


def model_file(trained, method: str) -> Path:
    """The ONNX file of one format (``fp32``, ``rtn``, ``gptq``, ``awq``), built once."""
    out = folder(trained)
    path = out / f"model_{method}.onnx"
    if path.is_file():
        return path
    if method == "fp32":
        return onnx_export.export(trained.model, path)
    train_text, _ = tokenizer.corpus_text()
    calibration = calibration_windows(trained.tokenizer.encode(train_text))
    q = quantize(trained.model, method, calibration)
    base = (
        model_file(trained, "fp32")
        if method != "awq"
        else onnx_export.export(q.base, out / "awq_folded_fp32.onnx")
    )
    return int4_onnx.write_nbits(base, path, q.codes)


FORMATS = {"fp32": "FP32", "rtn": "INT4 RTN", "gptq": "INT4 GPTQ", "awq": "INT4 AWQ"}


def held_out_rows(trained) -> np.ndarray:
    """The shared held-out windows (``evaluation.windows``) of this model's tokenizer."""
    return evaluation.windows(trained.tokenizer.encode(tokenizer.corpus_text()[1]))


def log_probs(window_logits: Callable[[list[int]], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Log-softmax of every window's logits, shape (windows, SEQ_LEN, vocab), float64."""
    out = np.stack([window_logits(row[:-1].tolist()) for row in rows]).astype(np.float64)
    top = out.max(axis=-1, keepdims=True)
    return out - top - np.log(np.exp(out - top).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(reference ‖ other) per token, in nats, from log-probabilities."""
    return float(np.mean(np.sum(np.exp(reference) * (reference - other), axis=-1)))


def perplexity_of(logp: np.ndarray, rows: np.ndarray) -> float:
    """``evaluation.perplexity`` of the windows from their log-probabilities (taken in order)."""
    windows = iter(logp)
    return evaluation.perplexity(lambda _ids: next(windows), rows)


def measure(trained, method: str) -> dict[str, float]:
    """Held-out perplexity, KL to FP32, file bytes and bits per weight of one file; cached as
    JSON beside it (speeds are not cached: they are measured fresh)."""
    path = model_file(trained, method)
    record = path.with_suffix(".json")
    if record.is_file():
        return json.loads(record.read_text())
    rows = held_out_rows(trained)
    reference = log_probs(
        onnx_export.window_logits(onnx_export.session(model_file(trained, "fp32"))), rows
    )
    logp = log_probs(onnx_export.window_logits(onnx_export.session(path)), rows)
    result = {
        "perplexity": perplexity_of(logp, rows),
        "kl": kl_divergence(reference, logp),
        "file_bytes": file_bytes(path),
        "bits_per_weight": bits_per_weight(path),
    }
    with cache.atomic_output(record) as tmp:
        tmp.write_text(json.dumps(result))
    return result


def format_rows(trained) -> list[evaluation.FormatRow]:
    """One row per ONNX format: FP32, INT4 RTN/GPTQ/AWQ (ONNX Runtime), and GenAI's FP32 and INT4
    (its FP32 row tells the C++ loop's speed apart from the bit width's)."""
    from mldeploy.llm import genai

    prompt = held_out_rows(trained).reshape(-1)[: evaluation.PREFILL_TOKENS].tolist()
    rows = []
    for method, name in FORMATS.items():
        m = measure(trained, method)
        sess = onnx_export.session(model_file(trained, method))
        prefill, decode = onnx_export.rates(sess, prompt, evaluation.DECODE_TOKENS)
        label = name if method == "fp32" else f"{name} (MatMulNBits)"
        rows.append(
            evaluation.FormatRow(
                "ONNX Runtime", label, m["bits_per_weight"], m["file_bytes"], m["perplexity"],
                prefill, decode,
            )
        )  # fmt: skip
    rows += [genai.format_row(trained, precision) for precision in ("fp32", "int4")]
    return rows
