"""Preallocated KV cache for a left-padded batch.

Layout per layer: k, v [B, Hkv, max_len, D] (the ops contract). Every sequence writes its
token t at the same column (prompt columns 0..P-1, then P, P+1, ...); sequence b's real
tokens start at `starts[b]` (its left padding), so attention reads columns
[starts[b], length) and positions are `column - starts[b]`.
"""
from __future__ import annotations

from typing import List, Optional

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        # one allocation for all layers: a single free, and contiguous per-layer slices
        self.storage = torch.zeros((n_layers, 2) + shape, dtype=dtype, device=device)
        self.k: List[torch.Tensor] = [self.storage[i, 0] for i in range(n_layers)]
        self.v: List[torch.Tensor] = [self.storage[i, 1] for i in range(n_layers)]
        self.batch, self.max_len = batch, max_len
        self.starts: Optional[torch.Tensor] = None  # [B] int64, first real column per sequence

    def fits(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> bool:
        s = self.storage
        return (s.shape[0] == n_layers and s.shape[2] == batch and s.shape[3] == n_kv_heads
                and s.shape[4] >= max_len and s.shape[5] == head_dim and s.dtype == dtype
                and s.device == device)
