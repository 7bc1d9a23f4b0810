"""Token-by-token generation with and without a KV cache, and its timing.

Without a cache every new token runs the model over the whole sequence so far, so the cost of a
step grows with its position. With a cache, the prompt is processed once (prefill) and each later
step (decode) computes one position and attends to the stored keys and values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from mldeploy.llm.kv_cache import KVCache
from mldeploy.llm.model import Llama


def _next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    net: Llama,
    prompt: list[int],
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """``max_new_tokens`` ids after ``prompt``: greedy when ``temperature == 0``, else sampled."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must not be negative")
    if len(prompt) + max_new_tokens > net.cfg.max_seq_len:
        raise ValueError(f"prompt + new tokens exceed max_seq_len={net.cfg.max_seq_len}")
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    ids = list(prompt)
    cache = KVCache.for_model(net.cfg, max_len=len(prompt) + max_new_tokens) if use_cache else None
    step_input = torch.tensor([ids])
    for _ in range(max_new_tokens):
        logits = net(step_input if use_cache else torch.tensor([ids]), cache)[0, -1]
        ids.append(_next(logits, temperature, generator))
        step_input = torch.tensor([[ids[-1]]])
    return ids[len(prompt) :]


@dataclass
class StepTimes:
    """Seconds per generated token, indexed by the position of the token being produced."""

    positions: list[int]
    cached: list[float]
    uncached: list[float]


@torch.no_grad()
def time_steps(net: Llama, prompt: list[int], n_tokens: int, repeats: int = 3) -> StepTimes:
    """Time each greedy step with and without the cache; the minimum of ``repeats`` runs.

    The minimum is the cleanest estimate on a shared machine: load only ever adds time.
    """
    cached = [[] for _ in range(n_tokens)]
    uncached = [[] for _ in range(n_tokens)]
    for _ in range(repeats):
        for use_cache, out in ((True, cached), (False, uncached)):
            ids = list(prompt)
            cache = (
                KVCache.for_model(net.cfg, max_len=len(prompt) + n_tokens) if use_cache else None
            )
            x = torch.tensor([ids])
            for i in range(n_tokens):
                start = time.perf_counter()
                logits = net(x if use_cache else torch.tensor([ids]), cache)[0, -1]
                ids.append(int(logits.argmax()))
                out[i].append(time.perf_counter() - start)
                x = torch.tensor([[ids[-1]]])
    positions = [len(prompt) + i for i in range(n_tokens)]
    return StepTimes(positions, [min(t) for t in cached], [min(t) for t in uncached])


@torch.no_grad()
def prefill_decode_rates(
    net: Llama, prompt: list[int], n_decode: int, repeats: int = 5
) -> tuple[float, float]:
    """Tokens per second of the prefill (whole prompt, one call) and of cached decode steps."""
    prefill, decode = [], []
    for _ in range(repeats):
        cache = KVCache.for_model(net.cfg, max_len=len(prompt) + n_decode)
        start = time.perf_counter()
        logits = net(torch.tensor([prompt]), cache)[0, -1]
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n_decode):
            logits = net(torch.tensor([[int(logits.argmax())]]), cache)[0, -1]
        decode.append(time.perf_counter() - start)
    return len(prompt) / min(prefill), n_decode / min(decode)


def speedup_at(times: StepTimes, position: int, half_window: int = 4) -> tuple[float, float]:
    """Median seconds per token without and with the cache over positions ``position ± 4``."""
    near = [i for i, p in enumerate(times.positions) if abs(p - position) <= half_window]
    if not near:
        raise ValueError(f"no timed step near position {position}")
    return (
        float(np.median([times.uncached[i] for i in near])),
        float(np.median([times.cached[i] for i in near])),
    )
