"""How each pass of the decoder rotates q/k, writes the paged KV cache and attends.

`Decoder` computes q/k/v the same way for every pass (`Decoder._qkv`: token-major views
[B, S, H, D] of the projection output, q/k norms applied) and hands them to one of these:

- `PagedExtendAttention`: the new tokens of several sequences packed as one row [1, T] (prompts,
  appended tokens, recomputation), through `fastrlhf.ops` (rotary, paged_kv_append,
  paged_attention_prefill: each token sees its sequence's cached keys and the new ones up to
  itself);
- `PagedDecodeAttention`: one token per sequence [B, 1] through `fastrlhf.ops` (the split-K paged
  decode kernel, batch-invariant; what GPUs run, and CUDA graphs capture);
- `LeanPagedDecodeAttention`: the same decode step in plain torch, used only when every decode op
  resolves to the torch reference (CPU). There a small model's step costs per-op dispatch, not
  FLOPs, and the reference ops are written for clarity (each call checks its inputs, gathers
  rotary rows, builds masks); this one builds those per-step pieces once and shares them by all
  layers, and folds GQA groups into the query axis. tests/engine/test_paged_engine.py holds it
  equal to the ops.

Each has `rotate(q, k, qk) -> (q, k)` (in place; `qk` is one view over q's and k's heads when the
fused projection lays them out contiguously, else None) and `attend(i, q, k, v)` -> the
attention output of layer i as [B, S, Hq * D], ready for o_proj.

`PagedBatch` holds what the ops read besides q/k/v: where each new token is written
(`slots`), each sequence's block table, its length in the cache after this pass and, for
extend passes, the packed query offsets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .kv_cache import PagedKVCache


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) in place (Gemma2's logit and attention-score softcapping)."""
    return x.div_(cap).tanh_().mul_(cap)


def rotate_half_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> None:
    """Rotate-half rotary on the first rotary_dim features of t [..., D], in place; cos/sin are
    fp32 rows that broadcast to t[..., :rotary_dim // 2]. Computed in fp32, as the ops are."""
    half = rotary_dim // 2
    x1, x2 = t[..., :half], t[..., half:rotary_dim]
    f1, f2 = (x1, x2) if t.dtype == torch.float32 else (x1.float(), x2.float())
    r1 = f1 * cos - f2 * sin
    r2 = f2 * cos + f1 * sin
    x1.copy_(r1)
    x2.copy_(r2)


class _OpsAttention:
    """Rotary through `ops.rotary` (q as [B, S, Hq, D]; grouped layouts copy q out first)."""

    def __init__(self, dec, positions: torch.Tensor):
        self.dec, self.positions = dec, positions

    def rotate(self, q, k, qk):
        dec = self.dec
        b, s = q.shape[:2]
        q = q.reshape(b, s, dec.n_heads, dec.head_dim)
        dec.ops_rotary(q.transpose(1, 2), k.transpose(1, 2), dec.cos, dec.sin, self.positions,
                       rotary_dim=dec.spec.rotary_dim)
        return q, k


@dataclass
class PagedBatch:
    slots: torch.Tensor          # [T] int64: block * block_size + offset of each new token
    block_tables: torch.Tensor   # [B, max_blocks] int32
    seq_lens: torch.Tensor       # [B] int32: tokens in the cache after this pass
    cu_q_lens: Optional[torch.Tensor] = None  # [B + 1] int32 (extend passes)
    max_q_len: Optional[int] = None


class PagedExtendAttention(_OpsAttention):
    """The new tokens of B sequences packed [1, T, ...] (positions [1, T])."""

    def __init__(self, dec, positions, cache: PagedKVCache, batch: PagedBatch):
        super().__init__(dec, positions)
        self.cache, self.batch = cache, batch

    def attend(self, i, q, k, v):
        dec, b = self.dec, self.batch
        t = q.shape[1]
        if t == 0:  # a rank with nothing to extend, stepping with the others (ZeRO-3 lockstep)
            return q.new_zeros(1, 0, dec.n_heads * dec.head_dim)
        q = q.reshape(t, dec.n_heads, dec.head_dim)
        kp, vp = self.cache.k[i], self.cache.v[i]
        dec.ops_paged_append(kp, vp, k[0], v[0], b.slots)
        o = dec.ops_paged_prefill(q, kp, vp, b.block_tables, b.cu_q_lens, b.seq_lens, max_q_len=b.max_q_len,
                                  scale=dec.scale)
        return o.reshape(1, t, -1)


class PagedDecodeAttention(_OpsAttention):
    """One token per sequence [B, 1, ...] (positions [B]) through the ops. Under CUDA graphs the
    batch has padding rows (slot -1, length 0: their output is 0 and nothing is written)."""

    def __init__(self, dec, positions, cache: PagedKVCache, batch: PagedBatch):
        super().__init__(dec, positions[:, None])
        self.cache, self.batch = cache, batch

    def attend(self, i, q, k, v):
        dec, b = self.dec, self.batch
        n = q.shape[0]
        if n == 0:
            return q.new_zeros(0, 1, dec.n_heads * dec.head_dim)
        kp, vp = self.cache.k[i], self.cache.v[i]
        dec.ops_paged_append(kp, vp, k[:, 0], v[:, 0], b.slots)
        o = dec.ops_paged_decode(q.reshape(n, dec.n_heads, dec.head_dim), kp, vp, b.block_tables, b.seq_lens,
                                 scale=dec.scale)
        return o.reshape(n, 1, -1)


class LeanPagedDecodeAttention:
    """The paged decode step in plain torch, the same function as `PagedDecodeAttention` on the
    reference: rotary rows gathered once per step (q and k rotated by one call where they are one
    view), the block gather index and the length mask built once per step for all layers, the
    cache write one indexed copy, and GQA groups folded into the query axis (no copy of the keys
    per query head). Every row is real (eager CPU steps have no padding rows)."""

    def __init__(self, dec, positions, cache: PagedKVCache, batch: PagedBatch):
        self.dec, self.cache = dec, cache
        b, dev = positions.shape[0], positions.device
        self.b = b
        if dec.spec.rotary_dim:  # rows [B, 1, 1, half] broadcast over [B, S=1, heads, half]; the
            cos = dec.cos[positions][:, None, None, :]  # grouped layout's q (and q+k) views are
            sin = dec.sin[positions][:, None, None, :]  # [B, 1, Hkv, heads of a group, D]
            self.k_rows = (cos, sin)
            self.q_rows = (cos[..., None, :], sin[..., None, :]) if dec.grouped_qkv else self.k_rows
        bs = cache.block_size
        self.write_block, self.write_row = batch.slots // bs, batch.slots % bs
        lens = batch.seq_lens.long()
        n_blocks = (int(lens.max()) + bs - 1) // bs if b else 0
        self.tables = batch.block_tables[:, :n_blocks].long()       # [B, nb]
        visible = torch.arange(n_blocks * bs, device=dev)[None, :] < lens[:, None]
        self.bias = torch.zeros(b, 1, 1, n_blocks * bs, dtype=torch.float32, device=dev)
        self.bias.masked_fill_(~visible[:, None, None, :], float("-inf"))

    def rotate(self, q, k, qk):
        rd = self.dec.spec.rotary_dim
        if qk is not None:  # q and k heads are one view (shaped like q): one call for both
            rotate_half_(qk, *self.q_rows, rd)
        else:
            rotate_half_(q, *self.q_rows, rd)
            rotate_half_(k, *self.k_rows, rd)
        return q, k

    def _read(self, pool):
        """The sequences' blocks of one layer's pool as [B, Hkv, nb * block_size, D] (one gather;
        the block and row axes of the gathered copy merge without another copy)."""
        g = pool.transpose(0, 1)[:, self.tables]         # [Hkv, B, nb, bs, D]
        return g.transpose(0, 1).flatten(2, 3)

    def attend(self, i, q, k, v):
        dec, b = self.dec, self.b
        kp, vp = self.cache.k[i], self.cache.v[i]
        kp[self.write_block, :, self.write_row] = k[:, 0]
        vp[self.write_block, :, self.write_row] = v[:, 0]
        keys, values = self._read(kp), self._read(vp)
        qg = q.reshape(b, dec.n_kv_heads, -1, dec.head_dim)  # [B, Hkv, group, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [B, Hkv, group, n]
        scores.mul_(dec.scale)
        if dec.attn_softcap is not None:  # before the mask, as the ops do
            softcap_(scores, dec.attn_softcap)
        probs = torch.softmax(scores.add_(self.bias), dim=-1)
        o = torch.matmul(probs.to(values.dtype), values)  # [B, Hkv, group, D]
        return o.reshape(b, 1, -1)
