"""One yardstick for every engine: held-out perplexity on the same windows, and one table row.

Every engine (PyTorch, ONNX Runtime, ONNX Runtime GenAI, llama.cpp) is asked for the logits of
the same non-overlapping windows of held-out tokens, each window evaluated from an empty cache;
perplexity is exp of the mean next-token cross-entropy over all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SEQ_LEN = 128  # tokens per window (the training sequence length)
MAX_WINDOWS = 64  # at most 64 × 128 = 8,192 held-out tokens
PREFILL_TOKENS = 256  # prompt length for the prefill rate in every engine's table row
DECODE_TOKENS = 64  # tokens generated (greedy, one thread) for the decode rate


def windows(ids: list[int], seq_len: int = SEQ_LEN, max_windows: int = MAX_WINDOWS) -> np.ndarray:
    """``(n, seq_len + 1)`` int64 array: each row is a window's inputs plus its last target."""
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"{len(ids)} tokens are too few for one window of {seq_len}")
    data = np.asarray(ids[: n * seq_len + 1], dtype=np.int64)
    return np.stack([data[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token cross-entropy (nats) of ``logits (n, vocab)`` against ``targets (n,)``."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return float(np.mean(log_z - logits[np.arange(len(targets)), targets]))


def perplexity(window_logits: Callable[[list[int]], np.ndarray], rows: np.ndarray) -> float:
    """exp(mean cross-entropy); ``window_logits(ids)`` returns ``(len(ids), vocab)`` logits."""
    losses = [cross_entropy(window_logits(row[:-1].tolist()), row[1:]) for row in rows]
    return math.exp(float(np.mean(losses)))


@dataclass(frozen=True)
class FormatRow:
    """One line of 5.6's format table: the same model in one file format and engine."""

    engine: str  # "PyTorch", "ONNX Runtime", "ONNX Runtime GenAI", "llama.cpp"
    format: str  # e.g. "FP32", "INT4 GPTQ (MatMulNBits)", "GGUF Q4_K_M"
    bits_per_weight: float  # file bits per parameter of the quantized matrices' layers
    file_bytes: int
    perplexity: float
    prefill_tokens_per_s: float  # PREFILL_TOKENS-token prompt, one thread
    decode_tokens_per_s: float  # DECODE_TOKENS greedy tokens after it, one thread
