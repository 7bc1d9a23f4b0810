"""The Llama decoder: logits parity with transformers, KV-cached generation, cache key, memory."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from mldeploy.llm import generation, training
from mldeploy.llm.kv_cache import KVCache
from mldeploy.llm.model import Llama, LlamaConfig, to_transformers


@pytest.fixture(scope="module")
def net() -> Llama:
    torch.manual_seed(0)
    model = Llama().eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm or RoPE layout shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_size_is_about_3_4_million_parameters(net: Llama) -> None:
    assert 3.3e6 < net.n_params() < 3.5e6


def test_logits_match_transformers_llama(net: Llama) -> None:
    hf = to_transformers(net)
    x = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = net(x), hf(x).logits
    # measured |Δ|max = 0.0 on the pinned single compute path; 1e-5 leaves room for other kernels
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_transformers_rejects_a_mismatched_layout(net: Llama) -> None:
    state = net.state_dict()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(256, 256)  # GQA needs 128 rows
    hf = to_transformers(net)
    with pytest.raises(RuntimeError, match="size mismatch"):
        hf.load_state_dict(state)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cached_and_uncached_generation_agree(net: Llama, temperature: float) -> None:
    prompt = [5, 17, 300, 42, 7]
    kw = {"temperature": temperature, "seed": 3}
    cached = generation.generate(net, prompt, 60, use_cache=True, **kw)
    uncached = generation.generate(net, prompt, 60, use_cache=False, **kw)
    assert cached == uncached
    assert len(cached) == 60


def test_cached_chunk_after_prefill_matches_full_forward(net: Llama) -> None:
    x = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(net.cfg, max_len=40)
    with torch.no_grad():
        full = net(x)
        first = net(x[:, :25], cache)
        rest = net(x[:, 25:], cache)  # a 15-token chunk attends to 25 cached positions
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_memory_formula_matches_allocation() -> None:
    cfg = LlamaConfig()
    cache = KVCache.for_model(cfg, batch=3, max_len=256)
    expected = KVCache.nbytes_formula(cfg.n_layers, 3, cfg.n_kv_heads, 256, cfg.head_dim)
    assert cache.nbytes == expected == 2 * 4 * 3 * 2 * 256 * 64 * 4


def test_bad_generation_requests_are_clear_errors(net: Llama) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generation.generate(net, [], 5)
    with pytest.raises(ValueError, match="max_seq_len"):
        generation.generate(net, [1] * 500, 50)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        net(torch.zeros(1, 513, dtype=torch.int64))


def test_cache_key_follows_config_and_training_code() -> None:
    cfg, corpus = training.TrainConfig(), ("train text", "valid text")
    sources = [inspect.getsource(m) for m in training.source_modules()]
    key = training.cache_key(cfg, corpus)
    assert training.cache_key(cfg, corpus, sources) == key
    assert training.source_modules()[-1] is training
    edited = [*sources[:-1], sources[-1].replace("weight_decay=0.1", "weight_decay=0.2")]
    assert edited != sources
    assert training.cache_key(cfg, corpus, edited) != key
    assert training.cache_key(dataclasses.replace(cfg, steps=301), corpus) != key
    assert training.cache_key(cfg, ("train text!", "valid text")) != key


def test_training_does_not_depend_on_the_callers_grad_mode() -> None:
    """5.6d turns gradients off before ``train_or_load``; run first, it must still train."""
    small = LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
    cfg = training.TrainConfig(model=small, steps=3, batch_size=2, seq_len=16, warmup=1)
    ids = torch.arange(200, dtype=torch.int64) % small.vocab_size
    losses, weights = [], []
    for grad in (True, False):
        torch.manual_seed(0)
        net = Llama(small)
        with torch.set_grad_enabled(grad):
            losses.append(training.fit(net, ids, cfg))
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert losses[0] == losses[1]
    assert torch.equal(weights[0], weights[1])
