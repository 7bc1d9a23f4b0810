"""The measurement bench of section 5.3: one trained character LM, fixed calibration and held-out
windows, and one record per quantized variant (bytes, perplexity, KL and agreement vs FP32)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from mldeploy import export, runtime
from mldeploy.export import sizes
from mldeploy.paths import artifacts_dir
from mldeploy.quant import cache, charlm, int4_onnx, weight_only
from mldeploy.quant.fake_quant import QuantSpec, packed_bytes


@dataclass
class LMBench:
    """Everything the variants are measured against."""

    model: charlm.CharMLP
    corpus: charlm.Corpus
    calibration: np.ndarray  # windows from the training files
    x: np.ndarray  # held-out windows and their next characters
    y: np.ndarray
    reference: np.ndarray  # FP32 PyTorch logits on ``x``
    out_dir: Path
    fp32_onnx: Path
    was_cached: bool
    # weight-only quantized models by (spec, method): see ``quantized_once``
    quantized: dict = field(default_factory=dict, repr=False)


def lm_bench(
    cfg: charlm.CharLMConfig | None = None, n_calibration: int = 8192, n_eval: int = 4096
) -> LMBench:
    """Train (or load) the model, draw the windows, export the FP32 ONNX file."""
    cfg = cfg or charlm.CharLMConfig()
    corpus = charlm.load_corpus()
    model, cached = charlm.cached_charlm(cfg, corpus)
    calibration, _ = charlm.sample_windows(corpus.train, cfg.context, n_calibration, seed=1)
    x, y = charlm.sample_windows(corpus.valid, cfg.context, n_eval, seed=2)
    out = artifacts_dir("5.3", f"{cfg.key()}-{cache.source_digest(export.formats)}")
    fp32 = out / "charlm_fp32.onnx"
    if not fp32.is_file():
        with cache.atomic_output(fp32) as tmp:
            export.export_onnx(model, torch.from_numpy(x[:4]), tmp)
    return LMBench(model, corpus, calibration, x, y, charlm.logits_of(model, x), out, fp32, cached)


def bench_for(bench: LMBench, model: charlm.CharMLP, tag: str) -> LMBench:
    """The same windows and FP32 reference for another model (e.g. a fine-tuned one), with its own
    FP32 ONNX export: quantized files must start from *that* model's embedding and biases."""
    out = artifacts_dir("5.3", bench.out_dir.name, tag)
    fp32 = out / "charlm_fp32.onnx"
    # Same graph, new weights: swap the initializers by name
    # instead of exporting again (seconds saved).
    proto = onnx.load(str(bench.fp32_onnx))
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    for init in proto.graph.initializer:
        if init.name in state:
            init.CopyFrom(numpy_helper.from_array(state[init.name].astype(np.float32), init.name))
    with cache.atomic_output(fp32) as tmp:
        onnx.save(proto, str(tmp))
    return LMBench(
        model,
        bench.corpus,
        bench.calibration,
        bench.x,
        bench.y,
        bench.reference,
        out,
        fp32,
        bench.was_cached,
    )


@dataclass(frozen=True)
class Point:
    """One variant on the accuracy–size plane; ``on_disk`` is False when the size is an estimate."""

    name: str
    family: str
    bytes: int
    perplexity: float
    kl: float
    agreement: float
    on_disk: bool = True


def onnx_point(bench: LMBench, name: str, family: str, path: str | Path) -> Point:
    """Measure an ONNX file with ONNX Runtime on the held-out windows."""
    logits = charlm.session_logits(runtime.make_session(path), bench.x)
    m = charlm.lm_metrics(logits, bench.y, bench.reference)
    return Point(name, family, sizes.artifact_bytes(path), m.perplexity, m.kl, m.agreement)


def torch_point(
    bench: LMBench,
    name: str,
    family: str,
    model: torch.nn.Module,
    n_bytes: int,
    on_disk: bool = False,
) -> Point:
    """Measure a PyTorch model (fake-quantized weights) whose packed size is ``n_bytes``."""
    m = charlm.lm_metrics(charlm.logits_of(model, bench.x), bench.y, bench.reference)
    return Point(name, family, n_bytes, m.perplexity, m.kl, m.agreement, on_disk)


def estimated_bytes(bench: LMBench, spec: QuantSpec) -> int:
    """Size of the FP32 file with every Linear weight bit-packed at ``spec`` (for widths that have
    no ONNX Runtime kernel, such as 3 bits)."""
    total = sizes.artifact_bytes(bench.fp32_onnx)
    for layer in bench.model.linears().values():
        w = layer.weight
        total += packed_bytes(w.numel(), spec, w.shape[0]) - 4 * w.numel()
    return total


def change_pct(value: float, base: float) -> float:
    """The relative change from ``base`` in percent, rounded to 2 decimals (a change that rounds to
    zero is +0.00, never -0.00)."""
    return round(100 * (value / base - 1), 2) + 0.0  # -0.0 + 0.0 is 0.0


def points_table(points: list[Point], fp32_bytes: int) -> str:
    """Text table: variant, size, compression, perplexity, change, KL and agreement vs FP32."""
    base = next(p.perplexity for p in points if p.family == "FP32")
    lines = [f"{'variant':<26}{'KiB':>9}{'×':>7}{'ppl':>8}{'Δppl':>8}{'KL':>9}{'agree':>7}"]
    for p in points:
        size = f"{p.bytes / 1024:.1f}" + ("" if p.on_disk else "*")
        change = change_pct(p.perplexity, base)
        lines.append(
            f"{p.name:<26}{size:>9}{fp32_bytes / p.bytes:>7.2f}{p.perplexity:>8.3f}"
            f"{change:>+7.2f}%{p.kl:>9.4f}{p.agreement:>7.3f}"
        )
    return "\n".join(lines)


def latency_ms(path: str | Path, x: np.ndarray, repeats: int = 30) -> float:
    """Median milliseconds of one ``session.run`` on the batch ``x`` (one thread, no spinning)."""
    session = runtime.make_session(path, threads=1)
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x)}
    return 1e3 * runtime.median_seconds(lambda: session.run(None, feed), repeats=repeats, warmup=3)


def quantized_once(bench: LMBench, spec: QuantSpec, method: str):
    """``weight_only.awq_model`` for AWQ, ``weight_only.quantize_model`` for RTN and GPTQ, computed
    once per bench, width and method: the bits curve and the table of 5.3c need the same models,
    and GPTQ or AWQ takes seconds each."""
    key = (spec, method)
    if key not in bench.quantized:
        if method == "awq":
            bench.quantized[key] = weight_only.awq_model(bench.model, spec, bench.calibration)
        else:
            bench.quantized[key] = weight_only.quantize_model(
                bench.model, spec, method, bench.calibration
            )
    return bench.quantized[key]


def weight_only_point(
    bench: LMBench, spec: QuantSpec, method: str, name: str | None = None
) -> tuple[Point, torch.nn.Module]:
    """Quantize every Linear with ``method`` at ``spec``; write a real MatMulNBits file when the
    operator supports the format (2/4/8 bits, block of 16 to 256 inputs), else estimate the size."""
    name = name or f"{method.upper()} {spec.label()}"
    family = f"{method.upper()} {spec.bits}-bit"
    g = spec.group_size
    writable = spec.bits in (2, 4, 8) and g is not None and 16 <= g <= 256 and g & (g - 1) == 0
    fp32_onnx, scales = bench.fp32_onnx, {}
    if method == "awq":  # codes of the model with the scales folded in, plus fc1's input scale
        result = quantized_once(bench, spec, "awq")
        quantized, codes = result.quantized, result.codes
        if writable:
            fp32_onnx = bench_for(bench, result.folded, f"awq-folded-{spec.bits}-{g}").fp32_onnx
            scales = {"fc1": result.input_scale.numpy()}
    else:
        quantized, codes = quantized_once(bench, spec, method)
    if writable:
        path = int4_onnx.write_nbits(
            fp32_onnx, bench.out_dir / f"{method}_{spec.bits}bit_g{g}.onnx", codes, scales
        )
        return onnx_point(bench, name, family, path), quantized
    return torch_point(bench, name, family, quantized, estimated_bytes(bench, spec)), quantized


@dataclass(frozen=True)
class BitsPoint:
    """Perplexity at a storage cost in bits per Linear weight (scales and zero points included)."""

    method: str
    label: str
    bits_per_weight: float
    perplexity: float


def group_bits(spec: QuantSpec) -> float:
    """Bits per weight of the MatMulNBits layout: the codes, plus an FP32 scale and a zero point of
    ``bits`` bits per group."""
    g = spec.group_size
    if g is None:
        raise ValueError("bits per weight are defined here for group-wise formats")
    return spec.bits + (32 + spec.bits) / g


def bits_curve(
    bench: LMBench, bits: tuple[int, ...] = (2, 3, 4, 8), group_size: int = 128
) -> list[BitsPoint]:
    """Held-out perplexity of RTN, GPTQ and AWQ at each width, groups of ``group_size``
    (dequantized weights in PyTorch: the same numbers a MatMulNBits file gives, see the tests)."""
    points = []
    for b in bits:
        spec = QuantSpec(b, group_size)
        for method in weight_only.METHODS:
            result = quantized_once(bench, spec, method)
            model_q = result.quantized if method == "awq" else result[0]
            ppl = torch_point(bench, "", "", model_q, 1).perplexity
            points.append(
                BitsPoint(method.upper(), f"{b}-bit g{group_size}", group_bits(spec), ppl)
            )
    return points


def gguf_curve(
    bench: LMBench, formats: tuple[str, ...] | None = None
) -> list[tuple[BitsPoint, Point]]:
    """Write a real GGUF file per format, read it back with ``gguf``'s decoder and measure it."""
    from mldeploy.quant import gguf_export

    out = []
    for fmt in formats or gguf_export.FORMATS:
        path = gguf_export.write_gguf(bench.model, bench.out_dir / f"charlm_{fmt}.gguf", fmt)
        model, info = gguf_export.read_gguf(path)
        point = torch_point(bench, f"GGUF {fmt}", "GGUF", model, sizes.artifact_bytes(path), True)
        bpw = gguf_export.bits_per_weight(info, model)
        out.append((BitsPoint("GGUF", fmt, bpw, point.perplexity), point))
    return out


def calibration_curve(
    bench: LMBench, sizes_: tuple[int, ...] = (16, 64, 256, 1024, 4096, 8192)
) -> list[tuple[int, dict[str, float], float]]:
    """For each calibration-set size: held-out output error of each layer after 4-bit per-channel
    GPTQ (Hessian from that many windows), and the perplexity of static INT8 (MinMax)."""
    from mldeploy.quant import gptq, int8_ptq, metrics

    calib = weight_only.layer_inputs(bench.model, bench.calibration[: max(sizes_)])
    held_out = weight_only.layer_inputs(bench.model, bench.x)
    rows = []
    for n in sizes_:
        errors = {}
        for name, layer in bench.model.linears().items():
            w = layer.weight.detach()
            qw = gptq.gptq_quantize(w, gptq.hessian(calib[name][:n]), QuantSpec(4))
            errors[name] = metrics.output_error(held_out[name], w, qw.dequantize())
        path = int8_ptq.quantize_int8_qdq(
            bench.fp32_onnx, bench.out_dir / f"int8_static_n{n}.onnx", bench.calibration[:n]
        )
        rows.append((n, errors, onnx_point(bench, f"n={n}", "INT8", path).perplexity))
    return rows


def latency_side_by_side(
    paths: dict[str, str | Path], x: np.ndarray, rounds: int = 5, repeats: int = 20
) -> dict[str, float]:
    """Median milliseconds per ``session.run`` of each file on batch ``x``, measured in interleaved
    rounds (every file once per round) so that load on the machine hits all of them alike."""
    sessions = {name: runtime.make_session(p, threads=1) for name, p in paths.items()}
    feed = {name: {s.get_inputs()[0].name: np.ascontiguousarray(x)} for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, s in sessions.items():
            times[name].append(
                runtime.median_seconds(
                    lambda s=s, f=feed[name]: s.run(None, f), repeats=repeats, warmup=2
                )
            )
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}
