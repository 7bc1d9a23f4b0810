"""A key/value cache: per layer, preallocated (batch, kv_heads, max_len, head_dim) tensors."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every position computed so far, for each layer.

    Memory is ``2 (K and V) × layers × batch × kv_heads × max_len × head_dim × bytes per element``
    (``nbytes_formula``); ``nbytes`` sums the tensors actually allocated.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, cfg, batch: int = 1, max_len: int | None = None) -> KVCache:
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` at the next positions; return this layer's keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (after every layer has stored them)."""
        self.length += n

    @property
    def nbytes(self) -> int:
        """Bytes held by the allocated key and value tensors (measured)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def nbytes_formula(
        n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, bytes_per: int = 4
    ) -> int:
        """2 × layers × batch × kv_heads × positions × head_dim × bytes per element."""
        return 2 * n_layers * batch * n_kv_heads * max_len * head_dim * bytes_per
