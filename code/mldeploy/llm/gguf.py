"""The tiny Llama as GGUF files, run in llama.cpp (llama-cpp-python).

Two ways in: llama.cpp's own tools (``convert_hf_to_gguf.py`` for F32/F16, then
``llama_model_quantize`` for Q8_0, Q4_0, Q4_K_M), and 5.3c's k-quant encoder, whose Q4_K bytes
replace every tensor of a file llama.cpp quantized to Q4_K throughout (same layout, same size:
only the rounding differs). Every file is loaded by llama.cpp and scored on the held-out windows of
``evaluation``, like every other engine in 5.6.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import gguf as gguf_py
import numpy as np

from mldeploy.llm import converter, evaluation, genai, int4
from mldeploy.quant import cache, gguf_export

KINDS = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q4_K (llama.cpp)", "Q4_K (course)")
# The 28 projection matrices (7 per block), named as llama.cpp names them
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
N_CTX = 512  # room for the 256-token prompt and 64 generated tokens of the speed measurement


def folder(trained) -> Path:
    """``artifacts/5.6/<model>/gguf-<digest>/``: keyed on this code, the encoder, the converter."""
    digest = cache.source_digest(sys.modules[__name__], gguf_export, converter, genai.hf_folder)
    out = Path(trained.folder) / f"gguf-{digest}-{metadata.version('llama-cpp-python')}"
    out.mkdir(exist_ok=True)
    return out


def _file_name(kind: str) -> str:
    return kind.replace(" (", "-").replace(")", "").replace(".", "") + ".gguf"


def _quantize(source: Path, out: Path, ftype: str, pure: bool = False) -> None:
    """``llama_model_quantize`` in a child process: llama.cpp logs every tensor on stderr."""
    code = (
        "import sys, llama_cpp as l\n"
        "p = l.llama_model_quantize_default_params()\n"
        f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{ftype}; p.pure = {pure}; p.nthread = 1\n"
        "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"
    )
    cmd = [sys.executable, "-c", code, str(source), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"llama_model_quantize {ftype} failed:\n{done.stderr[-2000:]}")


def write_gguf(trained, kind: str) -> Path:
    """The GGUF file of ``kind`` (one of ``KINDS``), built once per model and code."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = folder(trained) / _file_name(kind)
    if path.is_file():
        return path
    with cache.atomic_output(path) as tmp:
        if kind in ("F32", "F16"):
            converter.convert(genai.hf_folder(trained), tmp, kind.lower())
        elif kind == "Q4_K (llama.cpp)":
            _quantize(write_gguf(trained, "F32"), tmp, "Q4_K_S", pure=True)
        elif kind == "Q4_K (course)":
            tmp.write_bytes(write_gguf(trained, "Q4_K (llama.cpp)").read_bytes())
            _encode_in_place(tmp, matrices(trained))
        else:
            _quantize(write_gguf(trained, "F32"), tmp, kind)
    return path


def matrices(trained) -> dict[str, np.ndarray]:
    """Every FP32 matrix (out, in) of the F32 GGUF under llama.cpp's names: the 28 projections,
    ``token_embd`` and ``output``."""
    reader = gguf_py.GGUFReader(write_gguf(trained, "F32"))
    return {
        t.name: np.array(t.data, dtype=np.float32).reshape(t.shape[::-1])
        for t in reader.tensors
        if len(t.shape) == 2
    }


def weights(trained) -> dict[str, np.ndarray]:
    """The 28 FP32 projection matrices (out, in)."""
    return {n: w for n, w in matrices(trained).items() if n.split(".")[-2] in PROJECTIONS}


def _encode_in_place(path: Path, fp32: dict[str, np.ndarray]) -> None:
    """Overwrite every Q4_K tensor's bytes with 5.3c's ``encode_q4_k`` of its FP32 matrix."""
    reader = gguf_py.GGUFReader(path, "r+")
    for t in reader.tensors:
        if t.tensor_type == gguf_py.GGMLQuantizationType.Q4_K:
            t.data[...] = gguf_export.quantize_tensor(fp32[t.name], "Q4_K").reshape(t.data.shape)
    reader.data.flush()


def dequantized(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Each projection of a GGUF file: its type name and its weights decoded to FP32 (out, in)."""
    out = {}
    for t in gguf_py.GGUFReader(path).tensors:
        if t.name.split(".")[-2] in PROJECTIONS:
            w = gguf_py.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = (t.tensor_type.name, np.asarray(w, np.float32).reshape(t.shape[::-1]))
    return out


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """‖W − Ŵ‖ / ‖W‖ (Frobenius)."""
    return float(np.linalg.norm(reference - approx) / np.linalg.norm(reference))


def vocabulary(path: Path):
    """llama.cpp's tokenizer of a GGUF file (``vocab_only``), without its start-up log line."""
    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):
        return Llama(model_path=str(path), vocab_only=True, verbose=False)


def load(path: Path, f32_cache: bool = False):
    """A llama.cpp model on one thread, keeping the logits of every position (for perplexity).

    llama.cpp stores the KV cache at F16 unless told otherwise: ``f32_cache`` keeps it at F32.
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return Llama(
        model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=1, n_threads_batch=1,
        logits_all=True, verbose=False, **cache,
    )  # fmt: skip


def window_logits(llm):
    """``ids → (len(ids), vocab)`` logits, each window from an empty cache."""

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits


def greedy(llm, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with llama.cpp's cache: prefill once, then one token per ``eval``."""
    llm.reset()
    llm.eval(prompt)
    new = []
    for _ in range(max_new_tokens):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new


def rates(llm, prompt: list[int], n_decode: int, repeats: int = 5) -> tuple[float, float]:
    """Tokens per second of the prefill and of ``n_decode`` greedy steps; best of ``repeats``."""
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        decode.append(time.perf_counter() - start)
    return len(prompt) / min(prefill), n_decode / min(decode)


def bits_per_weight(path: Path) -> float:
    """File bits per parameter of the projection matrices (as 5.6b counts its MatMulNBits)."""
    tensors = [t for t in gguf_py.GGUFReader(path).tensors if t.name.split(".")[-2] in PROJECTIONS]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def measure(trained, kind: str) -> dict[str, float]:
    """Held-out perplexity, bits per weight and file size of one GGUF file in llama.cpp; cached."""
    path = write_gguf(trained, kind)
    record = path.with_suffix(".json")
    if record.is_file():
        return json.loads(record.read_text())
    llm = load(path)
    result = {
        "perplexity": evaluation.perplexity(window_logits(llm), int4.held_out_rows(trained)),
        "bits_per_weight": bits_per_weight(path),
        "file_bytes": path.stat().st_size,
    }
    llm.close()
    with cache.atomic_output(record) as tmp:
        tmp.write_text(json.dumps(result))
    return result


def format_rows(trained, kinds: tuple[str, ...] = KINDS) -> list[evaluation.FormatRow]:
    """One table row per GGUF file (speeds measured now, one thread)."""
    prompt = int4.held_out_rows(trained).reshape(-1)[: evaluation.PREFILL_TOKENS].tolist()
    rows = []
    for kind in kinds:
        m = measure(trained, kind)
        llm = load(write_gguf(trained, kind))
        prefill, decode = rates(llm, prompt, evaluation.DECODE_TOKENS)
        llm.close()
        rows.append(
            evaluation.FormatRow(
                "llama.cpp",
                f"GGUF {kind}",
                m["bits_per_weight"],
                m["file_bytes"],
                m["perplexity"],
                prefill,
                decode,
            )  # fmt: skip
        )
    return rows
