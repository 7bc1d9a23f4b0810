"""ONNX Runtime GenAI: its model builder turns the Hugging Face folder into an ONNX model with
fused attention (``GroupQueryAttention``) and, at ``-p int4``, MatMulNBits weights; its API runs
the prefill and decode loop (KV cache included) in C++.

The builder runs offline: a local folder as input (``-i``), ``HF_HUB_OFFLINE=1``, and a cache
folder of its own. Always check the built model's perplexity: the builder can pick the wrong
matrix as ``lm_head`` (when ``intermediate_size == vocab_size``) and still produce a model that
runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from mldeploy.llm import evaluation, int4, model, tokenizer
from mldeploy.quant import cache


def hf_folder(trained) -> Path:
    """The model and tokenizer in Hugging Face form (``save_pretrained``), written once.

    ``tokenizer.model`` goes in too: from ``tokenizer.json`` alone llama.cpp's converter keeps no
    merge scores (all -1000), and llama.cpp then merges pieces in another order than SentencePiece.
    """
    out = Path(trained.folder) / f"hf-{cache.source_digest(model, tokenizer, hf_folder)}"
    if (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=trained.folder))
    # quiet: a notebook cell that happens to build the folder prints only its own output
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.to_transformers(trained.model).save_pretrained(tmp)
            tokenizer.to_transformers(trained.tokenizer.path).save_pretrained(tmp)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    shutil.copy(trained.tokenizer.path, tmp / "tokenizer.model")
    return _publish(tmp, out)


def _publish(tmp: Path, out: Path) -> Path:
    """Rename a finished folder into place; if another process won the race, keep theirs."""
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_folder(trained, precision: str = "int4") -> Path:
    """``python -m onnxruntime_genai.models.builder -p <precision> -e cpu``, once per model and
    code; the session is set to one intra-op thread."""
    if precision not in ("fp32", "int4"):
        raise ValueError(f"precision must be 'fp32' or 'int4', got {precision!r}")
    source = hf_folder(trained)
    key = cache.source_digest(sys.modules[__name__]) + "-" + metadata.version("onnxruntime-genai")
    out = Path(trained.folder) / f"genai-{precision}-{key}"
    if (out / "genai_config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".genai-{precision}-", dir=trained.folder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source)]
    command += ["-o", str(tmp), "-p", precision, "-e", "cpu", "-c", str(tmp / "hf-cache")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the GenAI builder failed:\n{done.stderr[-2000:]}")
    shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
    config = json.loads((tmp / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"]
    options.update(intra_op_num_threads=1, inter_op_num_threads=1)
    (tmp / "genai_config.json").write_text(json.dumps(config, indent=4))
    return _publish(tmp, out)


def load(folder: Path):
    """An ``og.Model`` on the CPU."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()  # the CPU
    return og.Model(config)


def _generator(net, capacity: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(net)
    params.set_search_options(max_length=capacity, do_sample=False)
    return og.Generator(net, params)


def window_logits(net):
    """``ids → (len(ids), vocab)`` logits of a fresh generator's prefill, for perplexity."""

    def logits(ids: list[int]) -> np.ndarray:
        generator = _generator(net, len(ids) + 1)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        out = generator.get_output("logits")
        return out.reshape(-1, out.shape[-1])[-len(ids) :]

    return logits


def greedy(net, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with GenAI's own loop (``generate_next_token``)."""
    generator = _generator(net, len(prompt) + max_new_tokens)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    new = []
    while len(new) < max_new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


def rates(net, prompt: list[int], n_decode: int, repeats: int = 5) -> tuple[float, float]:
    """Tokens per second of the prefill (``append_tokens``) and of ``n_decode`` greedy steps;
    best of ``repeats``."""
    prefill, decode = [], []
    for _ in range(repeats):
        generator = _generator(net, len(prompt) + n_decode + 1)
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n_decode):
            generator.generate_next_token()
        decode.append(time.perf_counter() - start)
    return len(prompt) / min(prefill), n_decode / min(decode)


def measure(trained, precision: str = "int4") -> dict[str, float]:
    """Held-out perplexity, KL to the ONNX FP32 file, bytes and bits per weight; cached."""
    folder = model_folder(trained, precision)
    record = folder / "measure.json"
    if record.is_file():
        return json.loads(record.read_text())
    rows = int4.held_out_rows(trained)
    fp32 = int4.onnx_export.session(int4.model_file(trained, "fp32"))
    reference = int4.log_probs(int4.onnx_export.window_logits(fp32), rows)
    logp = int4.log_probs(window_logits(load(folder)), rows)
    result = {
        "perplexity": int4.perplexity_of(logp, rows),
        "kl": int4.kl_divergence(reference, logp),
        "file_bytes": int4.file_bytes(folder / "model.onnx"),
        "bits_per_weight": int4.bits_per_weight(folder / "model.onnx"),
    }
    with cache.atomic_output(record) as tmp:
        tmp.write_text(json.dumps(result))
    return result


def format_row(trained, precision: str = "int4") -> evaluation.FormatRow:
    """The table row of the GenAI model (speeds measured now)."""
    m = measure(trained, precision)
    prompt = int4.held_out_rows(trained).reshape(-1)[: evaluation.PREFILL_TOKENS].tolist()
    prefill, decode = rates(
        load(model_folder(trained, precision)), prompt, evaluation.DECODE_TOKENS
    )
    name = "INT4 (MatMulNBits, builder)" if precision == "int4" else "FP32 (builder)"
    return evaluation.FormatRow(
        "ONNX Runtime GenAI", name, m["bits_per_weight"], m["file_bytes"], m["perplexity"],
        prefill, decode,
    )  # fmt: skip
