"""How each pass of the decoder rotates q/k, writes the KV cache and attends.

`Decoder` computes q/k/v the same way for every pass (`Decoder._qkv`: token-major views
[B, S, H, D] of the projection output, q/k norms applied) and hands them to one of these:

- `PrefillAttention`: the prompts, through `fastrlhf.ops` (rotary, cache append, prefill kernel);
- `DecodeAttention`: one token per sequence through `fastrlhf.ops` (the split-K decode kernel,
  batch-invariant; what GPUs run, and CUDA graphs capture);
- `LeanDecodeAttention`: the same decode step in plain torch, used only when every decode op
  resolves to the torch reference (CPU). There a small model's step costs per-op dispatch, not
  FLOPs, and the reference ops are written for clarity (each call gathers rotary rows, builds
  masks, expands GQA heads, scatters into the cache with advanced indexing); this one builds
  those per-step pieces once and shares them by all layers.

Each has `unpack` (None, or the prefill's packed-tokens -> [B, S, N] layout function),
`rotate(q, k, qk) -> (q, k)` (in place; `qk` is one view over q's and k's heads when the
fused projection lays them out contiguously, else None) and `attend(i, q, k, v)` -> the
attention output of layer i as [B, S, Hq * D] (packed like the input), ready for o_proj.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache


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
    unpack = None

    def __init__(self, dec, positions: torch.Tensor):
        self.dec, self.positions = dec, positions

    def rotate(self, q, k, qk):
        dec = self.dec
        b, s = q.shape[:2]
        q = q.reshape(b, s, dec.n_heads, dec.head_dim)
        dec.ops_rotary(q.transpose(1, 2), k.transpose(1, 2), dec.cos, dec.sin, self.positions,
                       rotary_dim=dec.spec.rotary_dim)
        return q, k


class PrefillAttention(_OpsAttention):
    """Prompts [B, P] (left-padded) written to cache columns 0..P-1. With `unpack`/`pack`, the
    hidden states hold only the real tokens [1, T, E] and attention alone sees [B, P]."""

    def __init__(self, dec, positions, attention_mask, cache: KVCache, unpack=None, pack=None):
        super().__init__(dec, positions)
        self.mask, self.cache, self.unpack, self.pack = attention_mask, cache, unpack, pack
        self.zero = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)

    def attend(self, i, q, k, v):
        dec = self.dec
        b, s = q.shape[:2]
        q = q.reshape(b, s, dec.n_heads, dec.head_dim).transpose(1, 2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        dec.ops_append(self.cache.k[i], self.cache.v[i], k, v, self.zero)
        o = dec.ops_attn_prefill(q, k, v, causal=True, attention_mask=self.mask, scale=dec.scale)
        o = o.transpose(1, 2).reshape(b, s, -1)
        return o if self.pack is None else self.pack(o)


class DecodeAttention(_OpsAttention):
    """One token per sequence at cache column write_col through the ops. `read_len` (python int)
    limits attention to the filled columns; None (CUDA graphs, fixed shapes) reads them all."""

    def __init__(self, dec, positions, write_col, cache_lens, cache: KVCache, read_len=None):
        super().__init__(dec, positions[:, None])
        self.write_col, self.cache_lens, self.cache, self.read_len = write_col, cache_lens, cache, read_len

    def attend(self, i, q, k, v):
        dec = self.dec
        kc, vc = self.cache.k[i], self.cache.v[i]
        dec.ops_append(kc, vc, k.transpose(1, 2), v.transpose(1, 2), self.write_col)
        if self.read_len is not None:
            kc, vc = kc[:, :, :self.read_len], vc[:, :, :self.read_len]
        b = q.shape[0]
        o = dec.ops_attn_decode(q.reshape(b, dec.n_heads, dec.head_dim), kc, vc, self.cache_lens,
                                cache_starts=self.cache.starts, scale=dec.scale)
        return o.reshape(b, 1, -1)


class LeanDecodeAttention:
    """The decode step in plain torch, the same function as `DecodeAttention` on the reference:
    rotary rows gathered once per step (q and k rotated by one call where they are one view),
    the left-padding bias built once per step, the cache write a plain column copy (every
    sequence writes the same column) and GQA groups folded into the query axis (no per-layer
    copy of the cache to expand KV heads)."""
    unpack = None

    def __init__(self, dec, positions, read_len: int, cache: KVCache):
        self.dec, self.cache = dec, cache
        self.col, self.n = read_len - 1, read_len
        b, dev = positions.shape[0], positions.device
        self.b = b
        if dec.spec.rotary_dim:  # rows [B, 1, 1, half] broadcast over [B, S=1, heads, half]; the
            cos = dec.cos[positions][:, None, None, :]  # grouped layout's q (and q+k) views are
            sin = dec.sin[positions][:, None, None, :]  # [B, 1, Hkv, heads of a group, D]
            self.k_rows = (cos, sin)
            self.q_rows = (cos[..., None, :], sin[..., None, :]) if dec.grouped_qkv else self.k_rows
        # every layer's cache views for this step, cut at once from the one [L, 2, B, Hkv, Smax, D]
        # allocation: the column written (as [B, 1, Hkv, D], the layout of this step's k/v) and
        # the filled columns that attention reads ([B, Hkv, n, D])
        col = cache.storage[:, :, :, None, :, self.col]
        filled = cache.storage[:, :, :, :, :self.n]
        self.k_col, self.v_col = col[:, 0].unbind(0), col[:, 1].unbind(0)
        self.k_read, self.v_read = filled[:, 0].unbind(0), filled[:, 1].unbind(0)
        visible = torch.arange(self.n, device=dev)[None, :] >= cache.starts[:, None]
        self.bias = torch.zeros(b, 1, 1, self.n, dtype=torch.float32, device=dev)
        self.bias.masked_fill_(~visible[:, None, None, :], float("-inf"))

    def rotate(self, q, k, qk):
        rd = self.dec.spec.rotary_dim
        if qk is not None:  # q and k heads are one view (shaped like q): one call for both
            rotate_half_(qk, *self.q_rows, rd)
        else:
            rotate_half_(q, *self.q_rows, rd)
            rotate_half_(k, *self.k_rows, rd)
        return q, k

    def attend(self, i, q, k, v):
        dec = self.dec
        self.k_col[i].copy_(k)
        self.v_col[i].copy_(v)
        b, vc = self.b, self.v_read[i]
        qg = q.reshape(b, dec.n_kv_heads, -1, dec.head_dim)  # [B, Hkv, group, D]
        scores = torch.matmul(qg, self.k_read[i].transpose(-1, -2)).float()  # [B, Hkv, group, n]
        scores.mul_(dec.scale)
        if dec.attn_softcap is not None:  # before the mask, as the ops do
            softcap_(scores, dec.attn_softcap)
        probs = torch.softmax(scores.add_(self.bias), dim=-1)
        o = torch.matmul(probs.to(vc.dtype), vc)  # [B, Hkv, group, D]
        return o.reshape(b, 1, -1)
