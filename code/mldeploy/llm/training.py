"""Train the tokenizer and the model once per machine; cache both under ``artifacts/5.6/``.

The cache key covers the configuration, the corpus text, the library versions, the pinned compute
path and the source code of the modules that produce the artifacts: editing any of them trains
again. Files are written to a temporary name and renamed, so a half-written file is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from mldeploy import reproducibility
from mldeploy.llm import evaluation, kv_cache, model, tokenizer
from mldeploy.llm.model import Llama, LlamaConfig
from mldeploy.llm.tokenizer import Tokenizer, corpus_text, train_tokenizer
from mldeploy.paths import artifacts_dir
from mldeploy.quant import cache
from mldeploy.reproducibility import single_thread
from mldeploy.training import set_seed


@dataclass(frozen=True)
class TrainConfig:
    """Training budget in steps (not wall time): about 10 minutes on one CPU core, pinned."""

    model: LlamaConfig = LlamaConfig()
    steps: int = 600
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 5e-3
    warmup: int = 20
    seed: int = 0


def source_modules() -> list:
    """Modules whose source code the trained artifacts depend on."""
    import sys

    return [tokenizer, model, kv_cache, evaluation, sys.modules[__name__]]


def cache_key(cfg: TrainConfig, corpus: tuple[str, str], sources: list[str] | None = None) -> str:
    """Short hash of everything the tokenizer and weights depend on."""
    import sentencepiece

    if sources is None:
        sources = [inspect.getsource(m) for m in source_modules()]
    blob = json.dumps(
        {
            "config": dataclasses.asdict(cfg),
            "corpus": hashlib.sha256("\0".join(corpus).encode()).hexdigest(),
            "torch": torch.__version__,
            "sentencepiece": sentencepiece.__version__,
            "compute": reproducibility.PINNED_ENV if reproducibility.pinned() else "native",
            "sources": [hashlib.sha256(s.encode()).hexdigest() for s in sources],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Trained:
    """A trained model, its tokenizer, and what training measured."""

    model: Llama
    tokenizer: Tokenizer
    folder: Path
    train_seconds: float
    final_loss: float
    valid_perplexity: float
    cached: bool


def batches(ids: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    starts = torch.randint(0, len(ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=generator)
    return ids[starts[:, None] + torch.arange(cfg.seq_len + 1)]


@torch.enable_grad()  # a caller that turned gradients off (an inference notebook) still trains
def fit(net: Llama, ids: torch.Tensor, cfg: TrainConfig) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(cfg.seed)
    # fused: its sqrt rounds alike on every CPU, unlike MKL's (see mldeploy.reproducibility)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95), fused=True
    )

    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    net.train()
    for _ in range(cfg.steps):
        chunk = batches(ids, cfg, generator)
        logits = net(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    net.eval()
    return float(np.mean(losses[-20:]))


@torch.no_grad()
def perplexity(net: Llama, ids: list[int]) -> float:
    """Held-out perplexity on ``evaluation.windows(ids)``: the windows every engine is scored on."""
    rows = evaluation.windows(ids)
    return evaluation.perplexity(lambda window: net(torch.tensor([window]))[0].numpy(), rows)


def train_or_load(cfg: TrainConfig = TrainConfig()) -> Trained:
    """The trained tokenizer and model for ``cfg``: from the cache, or trained now and cached."""
    corpus = corpus_text()
    folder = artifacts_dir("5.6") / f"llama-{cache_key(cfg, corpus)}"
    with cache.one_builder(folder):  # another process training it: wait, then load its files
        return _load_or_train(cfg, corpus, folder)


def _load_or_train(cfg: TrainConfig, corpus: tuple[str, str], folder: Path) -> Trained:
    weights, meta = folder / "model.pt", folder / "train.json"
    if meta.is_file():
        net = Llama(cfg.model)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        info = json.loads(meta.read_text())
        return Trained(
            net.eval(), Tokenizer(folder / "tokenizer.model"), folder, cached=True, **info
        )
    reproducibility.require_pinned()  # a cache holds only numbers from the pinned path
    folder.mkdir(parents=True, exist_ok=True)
    train_text, valid_text = corpus
    tok = Tokenizer(train_tokenizer(train_text, folder / "tokenizer.model", cfg.model.vocab_size))
    with single_thread():
        set_seed(cfg.seed)
        net = Llama(cfg.model)
        start = time.perf_counter()
        final_loss = fit(net, torch.tensor(tok.encode(train_text), dtype=torch.int64), cfg)
        seconds = time.perf_counter() - start
        ppl = perplexity(net, tok.encode(valid_text))
    tmp = weights.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(weights)
    info = {"train_seconds": seconds, "final_loss": final_loss, "valid_perplexity": ppl}
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(meta)  # written last: its presence means the folder is complete
    return Trained(net, tok, folder, cached=False, **info)
