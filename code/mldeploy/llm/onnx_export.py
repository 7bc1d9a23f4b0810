"""The Llama as an ONNX graph with a KV cache, and greedy decoding with ONNX Runtime.

The graph has the form of decoder models exported to ONNX (ONNX Runtime GenAI's, Hugging Face
Optimum's): inputs ``input_ids`` and the past keys and values of every layer, outputs ``logits``
and the present keys and values (the past with the new positions appended). The caller feeds the
present back as the next step's past. Sequence, past length and batch are dynamic, so one file
serves the prefill and every decode step.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from mldeploy import runtime
from mldeploy.export.formats import quiet_export, strip_onnx_metadata
from mldeploy.llm.model import Llama, apply_rope
from mldeploy.quant import cache

OPSET = 18


class KVCacheWrapper(nn.Module):
    """``(input_ids, k0, v0, k1, v1, …) → (logits, k0', v0', …)``: the model with an explicit cache.

    The past length comes from the past keys' shape; it sets the RoPE positions of the new tokens
    and the causal mask (a new token sees every past position and the new ones up to itself).
    """

    def __init__(self, net: Llama) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net, cfg = self.net, self.net.cfg
        b, t = input_ids.shape
        start = past[0].shape[2]
        cos, sin = net.rope_cos[start : start + t], net.rope_sin[start : start + t]
        mask = torch.arange(start + t)[None, :] <= (torch.arange(t) + start)[:, None]
        groups = cfg.n_heads // cfg.n_kv_heads
        x = net.model.embed_tokens(input_ids)
        present = []
        for i, block in enumerate(net.model.layers):
            attn, h = block.self_attn, block.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
            x = x + block.mlp(block.post_attention_layernorm(x))
        return (net.lm_head(net.model.norm(x)), *present)


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the cache: ``past_key_values.{i}.key`` → ``present.{i}.key``."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def name_weights(proto: onnx.ModelProto, net: Llama) -> None:
    """Give each Linear's weight initializer its PyTorch name (``model.layers.0.mlp.up_proj``).

    The exporter stores ``Wᵀ`` under a generated name (``val_82``); 5.3's ``write_nbits`` finds
    the weight of layer ``L`` by the name ``L.weight``. The match is by value, so it cannot pick
    the wrong matrix.
    """
    wanted = {
        name: m.weight.detach().numpy().T
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear)
    }
    renamed = {}
    for init in proto.graph.initializer:
        value = numpy_helper.to_array(init)
        for name, wt in wanted.items():
            if value.shape == wt.shape and np.array_equal(value, wt):
                renamed[init.name] = init.name = f"{name}.weight"
                del wanted[name]
                break
    if wanted:
        raise ValueError(f"no initializer holds the weight of {sorted(wanted)}")
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def export(net: Llama, path: str | Path) -> Path:
    """Export ``KVCacheWrapper(net)`` with dynamic batch, sequence and past length; one file."""
    cfg, path = net.cfg, Path(path)
    past_names, present_names = cache_names(cfg.n_layers)
    # Example sizes of at least 2: torch.export specializes dimensions of size 0 and 1.
    ids = torch.zeros(2, 3, dtype=torch.int64)
    past = [torch.zeros(2, cfg.n_kv_heads, 2, cfg.head_dim) for _ in past_names]
    batch, seq, past_len = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    with cache.atomic_output(path) as tmp, quiet_export(), torch.no_grad():
        torch.onnx.export(
            KVCacheWrapper(net.eval()),
            (ids, *past),
            str(tmp),
            input_names=["input_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
        proto = strip_onnx_metadata(onnx.load(str(tmp)))
        name_weights(proto, net)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return path


def model_digest(net: Llama) -> str:
    """Short hash of the weights: exported files are cached per set of weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().numpy().tobytes())
    return digest.hexdigest()[:12]


def cached_export(net: Llama, folder: Path, stem: str = "model_fp32") -> Path:
    """``folder/<stem>-<weights>-<source>.onnx``, exported once."""
    source = hashlib.sha256(inspect.getsource(KVCacheWrapper).encode()).hexdigest()[:8]
    path = Path(folder) / f"{stem}-{model_digest(net)}-{source}.onnx"
    return path if path.is_file() else export(net, path)


# --- running the graph in ONNX Runtime -----------------------------------------------------------


def session(path: str | Path) -> ort.InferenceSession:
    """One intra-op thread, no spinning: a fair and quiet measurement on a shared 2-core machine."""
    return runtime.make_session(path, threads=1)


def empty_past(sess: ort.InferenceSession, batch: int = 1) -> list[np.ndarray]:
    """Zero-length keys and values for every layer (the cache before the prompt)."""
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    return [np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in past]


def step(
    sess: ort.InferenceSession, ids: list[int] | np.ndarray, past: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call: logits ``(batch, len(ids), vocab)`` and the grown cache."""
    ids = np.asarray(ids, dtype=np.int64).reshape(len(past[0]), -1)
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, dict(zip(names, [ids, *past])))
    return out[0], out[1:]


def greedy(sess: ort.InferenceSession, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding: prefill the prompt once, then one token per call, feeding the cache back."""
    logits, past = step(sess, prompt, empty_past(sess))
    new = []
    for _ in range(max_new_tokens):
        new.append(int(logits[0, -1].argmax()))
        logits, past = step(sess, [new[-1]], past)
    return new


def window_logits(sess: ort.InferenceSession):
    """``ids → (len(ids), vocab)`` logits from an empty cache, for ``evaluation.perplexity``."""
    return lambda ids: step(sess, ids, empty_past(sess))[0][0]


def rates(
    sess: ort.InferenceSession, prompt: list[int], n_decode: int, repeats: int = 5
) -> tuple[float, float]:
    """Tokens per second of the prefill (one call) and of greedy decode steps; best of
    ``repeats`` (load on a shared machine only ever adds time)."""
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        logits, past = step(sess, prompt, empty_past(sess))
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n_decode):
            logits, past = step(sess, [int(logits[0, -1].argmax())], past)
        decode.append(time.perf_counter() - start)
    return len(prompt) / min(prefill), n_decode / min(decode)
