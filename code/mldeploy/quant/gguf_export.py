"""GGUF files (llama.cpp's format) for the character LM, written and read with the ``gguf`` package.

``gguf`` encodes the simple block formats (``Q8_0``, ``Q4_0``: 32 weights and one FP16 scale per
block) but only *decodes* the k-quants. :func:`encode_q4_k` and :func:`encode_q2_k` fill that gap
with the k-quant layout of llama.cpp's ``ggml-common.h``: super-blocks of 256 weights whose
sub-block scales and minimums are themselves quantized (6 bits in ``Q4_K``, 4 bits in ``Q2_K``)
against one FP16 scale and one FP16 minimum per super-block ("scales of scales").

``encode_q4_k`` searches each sub-block's scale and minimum as llama.cpp's
``quantize_row_q4_K_ref`` does (``search_scale_min``; its error is within 1 % of llama.cpp's, see
5.6c); ``encode_q2_k`` rounds each sub-block by its min and max. ``gguf``'s decoder and llama.cpp
read the bytes (checked in the tests).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from mldeploy.quant import cache
from mldeploy.quant.charlm import CharMLP

QK_K = 256
FORMATS = ("Q8_0", "Q4_0", "Q4_K", "Q2_K")
ARCH = "charmlp"


def _superblocks(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % QK_K:
        raise ValueError(f"rows of {w.shape[-1]} values do not split into super-blocks of {QK_K}")
    return w.reshape(-1, QK_K)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def search_scale_min(xs: np.ndarray, levels: int, steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Each sub-block's scale and minimum (≥ 0) as llama.cpp's ``make_qkx2_quants`` finds them.

    Try ``steps + 1`` grids slightly finer or coarser than min–max; for each grid's codes ``l``,
    fit ``scale·l − minimum`` to ``x`` by weighted least squares (weights ``rms + |x|``: large
    weights matter more), and keep the grid with the smallest weighted squared error.
    """
    w = np.sqrt((xs**2).mean(-1, keepdims=True)) + np.abs(xs)
    lo, hi = np.minimum(xs.min(-1), 0), xs.max(-1)
    span = np.where(hi > lo, hi - lo, 1.0)[..., None]
    sum_w, sum_x = w.sum(-1), (w * xs).sum(-1)

    def error(scale, offset, codes):
        return (w * (scale[..., None] * codes + offset[..., None] - xs) ** 2).sum(-1)

    codes = np.clip(np.rint(levels / span * (xs - lo[..., None])), 0, levels)
    best_scale, best_offset = (hi - lo) / levels, lo  # min–max: the starting point
    best = error(best_scale, best_offset, codes)
    for step in range(steps + 1):
        codes = np.clip(np.rint((levels - 1 + 0.1 * step) / span * (xs - lo[..., None])), 0, levels)
        sum_l, sum_l2, sum_xl = (
            (w * codes).sum(-1),
            (w * codes**2).sum(-1),
            (w * codes * xs).sum(-1),
        )
        det = sum_w * sum_l2 - sum_l**2
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = (sum_w * sum_xl - sum_x * sum_l) / det
            offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = offset > 0  # the stored minimum cannot be negative: refit through zero
            scale = np.where(positive, sum_xl / sum_l2, scale)
            offset = np.where(positive, 0.0, offset)
        err = error(scale, offset, codes)
        better = (det > 0) & (err < best)
        best = np.where(better, err, best)
        best_scale = np.where(better, scale, best_scale)
        best_offset = np.where(better, offset, best_offset)
    return best_scale, -best_offset


def _kquant_params(
    x: np.ndarray, sub: int, levels: int, scale_levels: int, search: bool = False
) -> tuple[np.ndarray, ...]:
    """Sub-block scales and minimums (by min–max, or by ``search_scale_min``), quantized against
    per-super-block FP16 ``d`` and ``dmin``; returns ``(d, dmin, sc, mn, codes)``. ``x``:
    (n, 256), ``sub`` values per sub-block."""
    n = len(x)
    xs = x.reshape(n, QK_K // sub, sub)
    if search:
        scale, minimum = search_scale_min(xs, levels)
    else:
        lo = np.minimum(xs.min(-1), 0)  # k-quants store y = d·sc·q − dmin·m with m ≥ 0
        scale, minimum = (xs.max(-1) - lo) / levels, -lo
    d = _fp16(scale.max(-1) / scale_levels)
    dmin = _fp16(minimum.max(-1) / scale_levels)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0)
        mn = np.where(dmin32[:, None] > 0, np.rint(minimum / dmin32[:, None]), 0)
    sc = np.clip(sc, 0, scale_levels).astype(np.uint8)
    mn = np.clip(mn, 0, scale_levels).astype(np.uint8)
    # Codes against the *quantized* scale and minimum, exactly as the decoder will rebuild them.
    step = (d32[:, None] * sc.astype(np.float32))[..., None]
    offset = (dmin32[:, None] * mn.astype(np.float32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint((xs + offset) / step), 0)
    codes = np.clip(q, 0, levels).astype(np.uint8)
    return d, dmin, sc, mn, codes


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """``block_q4_K`` bytes (n, 144): d, dmin (FP16), 12 bytes of 6-bit scales and minimums for 8
    sub-blocks of 32, then 128 bytes of 4-bit codes. 4.5 bits per weight."""
    x = _superblocks(w)
    n = len(x)
    d, dmin, sc, mn, codes = _kquant_params(x, 32, 15, 63, search=True)
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)  # low 6 bits of sc 0–3, top 2 of sc 4–7
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    c = codes.reshape(n, 4, 2, 32)  # sub-blocks 2j and 2j+1 share 32 bytes: low and high nibble
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate(
        [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs], axis=1
    )


def encode_q2_k(w: np.ndarray) -> np.ndarray:
    """``block_q2_K`` bytes (n, 84): 16 bytes of 4-bit scales and minimums for 16 sub-blocks of 16,
    64 bytes of 2-bit codes, then d and dmin (FP16). 2.625 bits per weight."""
    x = _superblocks(w)
    n = len(x)
    d, dmin, sc, mn, codes = _kquant_params(x, 16, 3, 15)
    scales = sc | (mn << 4)
    c = codes.reshape(n, 2, 4, 32)  # 128 values per 32 bytes: four 2-bit fields per byte
    qs = np.zeros((n, 2, 32), dtype=np.uint8)
    for k in range(4):
        qs |= c[:, :, k] << (2 * k)
    return np.concatenate(
        [
            scales,
            qs.reshape(n, 64),
            d.view(np.uint8).reshape(n, 2),
            dmin.view(np.uint8).reshape(n, 2),
        ],
        axis=1,
    )


def decode_kquant(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """Our own decoder of ``Q4_K``/``Q2_K`` bytes: ``y = d·sc·q − dmin·m`` per sub-block."""
    n = len(blocks)
    if fmt == "Q4_K":
        d, dmin = blocks[:, 0:2], blocks[:, 2:4]
        p = blocks[:, 4:16]
        sc = np.concatenate([p[:, 0:4] & 63, (p[:, 8:12] & 0x0F) | ((p[:, 0:4] >> 6) << 4)], 1)
        mn = np.concatenate([p[:, 4:8] & 63, (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)], 1)
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, 8, 32)
    elif fmt == "Q2_K":
        sc, mn = blocks[:, :16] & 0x0F, blocks[:, :16] >> 4
        shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        q = ((blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16)
        d, dmin = blocks[:, 80:82], blocks[:, 82:84]
    else:
        raise ValueError(f"not a k-quant handled here: {fmt}")
    d = d.copy().view(np.float16).astype(np.float32)
    dmin = dmin.copy().view(np.float16).astype(np.float32)
    step = (d * sc.astype(np.float32))[..., None]
    offset = (dmin * mn.astype(np.float32))[..., None]
    return (step * q.astype(np.float32) - offset).reshape(n, QK_K)


def quantize_tensor(w: np.ndarray, fmt: str) -> np.ndarray:
    """GGUF bytes of a 2-D weight, one row of blocks per weight row (uint8, shape (rows, bytes))."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if fmt == "Q4_K":
        return encode_q4_k(w).reshape(len(w), -1)
    if fmt == "Q2_K":
        return encode_q2_k(w).reshape(len(w), -1)
    if fmt in ("Q8_0", "Q4_0"):
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt])
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def write_gguf(model: CharMLP, path: str | Path, fmt: str) -> Path:
    """A GGUF file of ``model``: Linear weights in ``fmt``; embedding table and biases in F32
    (rows of 32 values do not fill a k-quant super-block)."""
    path = Path(path)
    with cache.atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_uint32(f"{ARCH}.context_length", model.context)
        writer.add_uint32(f"{ARCH}.embedding_length", model.embed.embedding_dim)
        writer.add_uint32(f"{ARCH}.feed_forward_length", model.fc1.out_features)
        writer.add_uint32(f"{ARCH}.vocab_size", model.embed.num_embeddings)
        writer.add_file_type(
            int(gguf.LlamaFileType[f"MOSTLY_{fmt}" if fmt != "Q4_K" else "MOSTLY_Q4_K_S"])
        )
        linears = {f"{name}.weight" for name in model.linears()}
        for name, tensor in model.state_dict().items():
            value = tensor.detach().float().numpy()
            if name in linears:
                writer.add_tensor(
                    name, quantize_tensor(value, fmt), raw_dtype=gguf.GGMLQuantizationType[fmt]
                )
            else:
                writer.add_tensor(name, np.ascontiguousarray(value))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf(path: str | Path) -> tuple[CharMLP, dict[str, tuple[str, int, int]]]:
    """The model a GGUF file holds, every tensor dequantized by ``gguf``'s own decoder; also
    ``name → (type, values, bytes)`` of each tensor."""
    reader = gguf.GGUFReader(path)
    fields = {
        key: int(reader.fields[f"{ARCH}.{key}"].parts[-1][0])
        for key in ("context_length", "embedding_length", "feed_forward_length")
    }
    model = CharMLP(
        fields["context_length"], fields["embedding_length"], fields["feed_forward_length"]
    )
    state, info = {}, {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions innermost first
        state[t.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
        info[t.name] = (t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
    model.load_state_dict(state)
    return model.eval(), info


def bits_per_weight(info: dict[str, tuple[str, int, int]], model: CharMLP) -> float:
    """Bits per Linear weight in a file read by :func:`read_gguf` (scales included)."""
    names = [f"{name}.weight" for name in model.linears()]
    return 8 * sum(info[n][2] for n in names) / sum(info[n][1] for n in names)
