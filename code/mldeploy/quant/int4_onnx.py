"""Real low-bit ONNX files: ``MatMulNBits`` (ONNX Runtime's weight-only 2/4/8-bit operator).

Two ways in: ONNX Runtime's own ``MatMulNBitsQuantizer`` (round-to-nearest), and
:func:`write_nbits`, which packs codes computed elsewhere (GPTQ, QAT) into the same operator.
Either way a ``Gemm`` must first become ``MatMul`` + ``Add``: the quantizer only looks at MatMul
and silently leaves a Gemm's FP32 weight in the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from mldeploy.quant import cache
from mldeploy.quant.fake_quant import QuantizedWeight
from mldeploy.runtime import quiet_logs, require_model

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def gemm_to_matmul(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ``Gemm(A, W, b)`` with a constant ``W`` (transB=1) as ``MatMul(A, Wᵀ) + b``.

    ``proto`` is changed in place (and returned).
    """
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and not attrs.get("transA", 0)
        )
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        inits[node.input[1]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(w), node.input[1])
        )
        if len(node.input) > 2 and node.input[2]:
            product = node.output[0] + "_matmul"
            nodes.append(
                helper.make_node(
                    "MatMul", [node.input[0], node.input[1]], [product], name=node.name + "_matmul"
                )
            )
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"
                )
            )
        else:
            nodes.append(
                helper.make_node("MatMul", node.input[:2], node.output, name=node.name + "_matmul")
            )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def quantize_nbits_rtn(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    block_size: int = 32,
    bits: int = 4,
    rewrite_gemm: bool = True,
) -> Path:
    """ONNX Runtime's round-to-nearest weight-only quantizer (asymmetric, one scale per block).

    ``rewrite_gemm=False`` shows the trap: the quantizer then leaves every Gemm in FP32.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(require_model(fp32_path)))
    if rewrite_gemm:
        proto = gemm_to_matmul(proto)
    with quiet_logs():
        quantizer = MatMulNBitsQuantizer(
            proto, bits=bits, block_size=block_size, is_symmetric=False
        )
        quantizer.process()
    out_path = Path(out_path)
    with cache.atomic_output(out_path) as tmp:
        onnx.save(quantizer.model.model, str(tmp))
    return out_path


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits layout of codes (N, K): shape (N, K / block_size, block_size·bits/8), uint8,
    the first value of each byte in its lowest bits."""
    n, k = codes.shape
    per_byte = 8 // bits
    c = codes.astype(np.uint8).reshape(n, k // per_byte, per_byte)
    packed = np.zeros((n, k // per_byte), dtype=np.uint8)
    for j in range(per_byte):
        packed |= c[:, :, j] << (bits * j)
    return packed.reshape(n, k // block_size, block_size * bits // 8)


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the (N, K) codes of a ``MatMulNBits`` weight."""
    flat = packed.reshape(packed.shape[0], -1)
    values = [(flat >> (bits * j)) & ((1 << bits) - 1) for j in range(8 // bits)]
    return np.stack(values, axis=-1).reshape(packed.shape[0], -1)[:, :k]


def read_codes(path: str | Path) -> dict[str, np.ndarray]:
    """The integer codes of every ``MatMulNBits`` node in ``path``, (N, K) per layer name."""
    proto = onnx.load(str(require_model(path)))
    inits = {t.name: t for t in proto.graph.initializer}
    codes = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            packed = numpy_helper.to_array(inits[node.input[1]])
            layer = node.input[1].rsplit(".weight", 1)[0]
            codes[layer] = unpack_codes(packed, attrs["bits"], attrs["K"])
    return codes


def compare_codes(
    path: str | Path, weights: dict[str, QuantizedWeight], floats: dict[str, torch.Tensor]
) -> tuple[int, int, int]:
    """Compare the codes in ``path`` with ``weights`` (the float weights are ``floats``): the
    number of codes, how many lie on a rounding tie (where either code is right), and how many
    differ anywhere else."""
    theirs = read_codes(path)
    total = ties = other = 0
    for layer, qw in weights.items():
        tie = qw.rounding_ties(floats[layer]).numpy()
        differ = theirs[layer] != qw.codes.numpy()
        total += differ.size
        ties += int(tie.sum())
        other += int((differ & ~tie).sum())
    return total, ties, other


def write_nbits(
    fp32_path: str | Path,
    out_path: str | Path,
    weights: dict[str, QuantizedWeight],
    input_scales: dict[str, np.ndarray] | None = None,
) -> Path:
    """Replace the weight of each ``Gemm``/``MatMul`` whose initializer is ``<layer>.weight`` by a
    ``MatMulNBits`` node holding the given codes, scales and zero points.

    ``input_scales[layer]``, if given, adds a ``Div`` of that layer's input by the scale (one value
    per input feature): AWQ's scales where no earlier layer can absorb them."""
    input_scales = input_scales or {}
    proto = gemm_to_matmul(onnx.load(str(require_model(fp32_path))))
    inits = {t.name: t for t in proto.graph.initializer}
    missing = sorted(
        set(weights)
        - {n.input[1][: -len(".weight")] for n in proto.graph.node if n.op_type == "MatMul"}
    )
    if missing:
        raise ValueError(
            f"no MatMul or Gemm with a weight named <layer>.weight for layers {missing}"
        )
    nodes = []
    for node in proto.graph.node:
        layer = (
            node.input[1][: -len(".weight")]
            if node.op_type == "MatMul" and len(node.input) > 1
            else ""
        )
        if layer not in weights:
            nodes.append(node)
            continue
        qw = weights[layer]
        codes = qw.codes.numpy().astype(np.int64)
        n, k = codes.shape
        blocks = qw.scale.shape[1]
        block_size, bits = k // blocks, qw.spec.bits
        container = 2 if bits <= 2 else 4 if bits <= 4 else 8  # the operator stores 2, 4 or 8 bits
        zero = qw.zero.numpy().astype(np.uint8)
        if container < 8:  # zero points are packed like the codes, padded to whole bytes per row
            pad = (-blocks) % (8 // container)
            zero = pack_codes(np.pad(zero, ((0, 0), (0, pad))), container, blocks + pad).reshape(-1)
        tensors = [
            numpy_helper.from_array(pack_codes(codes, container, block_size), f"{layer}.weight_q"),
            numpy_helper.from_array(
                qw.scale.numpy().astype(np.float32).reshape(-1), f"{layer}.weight_scales"
            ),
            numpy_helper.from_array(zero.reshape(-1), f"{layer}.weight_zero_points"),
        ]
        proto.graph.initializer.remove(inits.pop(node.input[1]))
        proto.graph.initializer.extend(tensors)
        source = node.input[0]
        if layer in input_scales:
            scale = np.asarray(input_scales[layer], dtype=np.float32).reshape(-1)
            proto.graph.initializer.append(numpy_helper.from_array(scale, f"{layer}.input_scale"))
            nodes.append(
                helper.make_node(
                    "Div",
                    [source, f"{layer}.input_scale"],
                    [f"{layer}.scaled_input"],
                    name=node.name + "_input_scale",
                )
            )
            source = f"{layer}.scaled_input"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [source] + [t.name for t in tensors],
                node.output,
                name=node.name + "_nbits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=container,
                block_size=block_size,
            )
        )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    if not any(op.domain == "com.microsoft" for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out_path = Path(out_path)
    with cache.atomic_output(out_path) as tmp:
        onnx.save(proto, str(tmp))
    return out_path


def float_weights(path: str | Path, min_elements: int = 1024) -> dict[str, int]:
    """Floating-point initializers with at least ``min_elements`` values (name → count): what a
    weight-only quantized file still stores in full precision."""
    proto = onnx.load(str(path))
    return {
        t.name: int(np.prod(t.dims))
        for t in proto.graph.initializer
        if t.data_type in FLOAT_TYPES and np.prod(t.dims) >= min_elements
    }


def op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each operator type a model has (sorted by name)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
