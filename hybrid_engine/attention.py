"""How each pass of the decoder rotates q/k, writes the paged KV cache and attends.

`Decoder` computes q/k/v the same way for every pass (`Decoder._qkv`: token-major views
[B, S, H, D] of the projection output, q/k norms applied) and hands them to one of these:

- `PagedPackedAttention`: one row [1, T] packing decode rows' tokens and the new tokens of
  several other sequences (prompts, appended tokens, recomputation), through `fastrlhf.ops`
  (rotary, paged_kv_append, paged_attention_decode for the decode rows, paged_attention_prefill
  for the rest: each token sees its sequence's cached keys and the new ones up to itself);
- `PagedDecodeAttention`: one token per sequence [B, 1] through `fastrlhf.ops` (the split-K paged
  decode kernel, batch-invariant; what GPUs run, and CUDA graphs capture);
- `LeanPagedDecodeAttention`, `LeanPagedPackedAttention`: the same passes in plain torch, used
  only when every paged op resolves to the torch reference (CPU). There a small model's step costs per-op dispatch, not
  FLOPs, and the reference ops are written for clarity (each call checks its inputs, gathers
  rotary rows, builds masks); this one builds those per-step pieces once and shares them by all
  layers, and folds GQA groups into the query axis. tests/engine/test_paged_engine.py holds it
  equal to the ops.

Each has `rotate(i, q, k, qk) -> (q, k)` (layer i's rotary table, in place; `qk` is one view over
q's and k's heads when the fused projection lays them out contiguously, else None) and
`attend(i, q, k, v)` -> the attention output of layer i as [B, S, Hq * D], ready for o_proj.
What differs between layers comes from the decoder: `dec.rotary_of(i)` (local/global rotary
tables) and `dec.window_of(i, n)` (the sliding window, passed to the ops as `window=` only where
it can hide keys); ALiBi slopes and the softcap are bound into `dec.ops_paged_*` (the lean paths
read `dec.alibi_slopes` and `dec.attn_softcap`).

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

    def rotate(self, i, q, k, qk):
        dec = self.dec
        b, s = q.shape[:2]
        q = q.reshape(b, s, dec.n_heads, dec.head_dim)
        cos, sin = dec.rotary_of(i)
        dec.ops_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, self.positions,
                       rotary_dim=dec.spec.rotary_dim)
        return q, k


def _window(dec, i: int, batch: "PagedBatch", block_size: int) -> dict:
    """The `window=` keyword of layer i's paged op call over `batch`, or none (the layer has no
    window, or it cannot hide a key of a sequence that fits the batch's block tables: a fixed
    width under CUDA graphs, so a captured step never changes its arguments)."""
    w = dec.window_of(i, batch.block_tables.shape[1] * block_size)
    return {} if w is None else {"window": w}


@dataclass
class PagedBatch:
    slots: torch.Tensor          # [T] int64: block * block_size + offset of each new token
    block_tables: torch.Tensor   # [B, max_blocks] int32
    seq_lens: torch.Tensor       # [B] int32: tokens in the cache after this pass
    cu_q_lens: Optional[torch.Tensor] = None  # [B + 1] int32 (extend passes)
    max_q_len: Optional[int] = None


class PagedPackedAttention(_OpsAttention):
    """One pass over tokens packed as one row [1, T, ...] (positions [1, T]): first `n_decode`
    decode rows (one token each, `decode` their tables and lengths), then the new tokens of
    extend rows (`extend`: tables, lengths, query offsets). Every token is written at once
    (`slots`); decode rows attend through the decode op, so a decoding sequence computes the same
    way whether or not others are being prefilled beside it, and extend tokens through the
    prefill op. So a step that admits new sequences is still one forward."""

    def __init__(self, dec, positions, cache: PagedKVCache, slots: torch.Tensor, n_decode: int,
                 decode: Optional[PagedBatch], extend: Optional[PagedBatch]):
        super().__init__(dec, positions)
        self.cache, self.slots, self.n_decode = cache, slots, n_decode
        self.decode, self.extend = decode, extend

    def attend(self, i, q, k, v):
        dec = self.dec
        t, nd = q.shape[1], self.n_decode
        if t == 0:  # a rank with nothing to run, stepping with the others (ZeRO-3 lockstep)
            return q.new_zeros(1, 0, dec.n_heads * dec.head_dim)
        q = q.reshape(t, dec.n_heads, dec.head_dim)
        kp, vp = self.cache.k[i], self.cache.v[i]
        dec.ops_paged_append(kp, vp, k[0], v[0], self.slots)
        parts = []
        if nd:
            d = self.decode
            parts.append(dec.ops_paged_decode(q[:nd], kp, vp, d.block_tables, d.seq_lens, scale=dec.scale,
                                              **_window(dec, i, d, self.cache.block_size)))
        if t > nd:
            e = self.extend
            parts.append(dec.ops_paged_prefill(q[nd:], kp, vp, e.block_tables, e.cu_q_lens, e.seq_lens,
                                               max_q_len=e.max_q_len, scale=dec.scale,
                                               **_window(dec, i, e, self.cache.block_size)))
        return torch.cat(parts).reshape(1, t, -1)


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
                                 scale=dec.scale, **_window(dec, i, b, self.cache.block_size))
        return o.reshape(n, 1, -1)


def _score_bias(dec, q_pos: torch.Tensor, k_pos: torch.Tensor, visible: torch.Tensor,
                window: Optional[int]) -> torch.Tensor:
    """The fp32 score bias of the lean paths: -inf where a key is not `visible` (bool
    [R, *Q, n] for queries at positions q_pos [R, *Q] over keys at k_pos [n]) or falls out of the
    sliding window (keys p - window < k <= p stay), plus ALiBi's slope[h] * (k - p) when the model
    has it. Shaped [R, 1 | Hkv, 1 | group, *Q, n] for scores laid out [R, Hkv, group, *Q, n]."""
    if window is not None:
        visible = visible & (k_pos > q_pos[..., None] - window)
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    bias = bias.masked_fill_(~visible, float("-inf"))[:, None, None]
    if dec.alibi_slopes is not None:
        dist = (k_pos - q_pos[..., None]).float()[:, None, None]
        bias = bias + dec.alibi_slopes.view(dec.n_kv_heads, -1, *[1] * q_pos.dim()) * dist
    return bias


class _LeanRotary:
    """Rotary on the CPU lean paths: the cos/sin rows of a pass gathered on first use of each
    rotary table (local/global layers have two) and shared by the layers that use it (q and k
    rotated by one call where they are one view)."""

    def _init_rotary(self, positions: torch.Tensor) -> None:
        """The positions [B, S] of the pass's q/k (laid out [B, S, heads, D]); `_rows` makes rows."""
        self.rotary_positions, self.rows = positions, {}  # id of a table's cos -> (q rows, k rows)

    def _rows(self, i):
        """Layer i's rotary rows [B, S, 1, half]; the grouped layout's q (and q+k) views are
        [B, S, Hkv, heads of a group, D]: one more broadcast axis."""
        dec = self.dec
        table_cos, table_sin = dec.rotary_of(i)
        rows = self.rows.get(id(table_cos))
        if rows is None:
            pos = self.rotary_positions
            cos, sin = table_cos[pos][:, :, None, :], table_sin[pos][:, :, None, :]
            q_rows = (cos[..., None, :], sin[..., None, :]) if dec.grouped_qkv else (cos, sin)
            rows = self.rows[id(table_cos)] = (q_rows, (cos, sin))
        return rows

    def rotate(self, i, q, k, qk):
        rd = self.dec.spec.rotary_dim
        q_rows, k_rows = self._rows(i)
        if qk is not None:  # q and k heads are one view (shaped like q): one call for both
            rotate_half_(qk, *q_rows, rd)
        else:
            rotate_half_(q, *q_rows, rd)
            rotate_half_(k, *k_rows, rd)
        return q, k


def _block_index(tables: torch.Tensor) -> torch.Tensor:
    """Block tables [B, nb] as the flat gather index of `_gather_blocks` (a padding entry, -1,
    reads block 0: its columns lie past the row's length and are masked)."""
    return tables.reshape(-1).clamp(min=0)


def _gather_blocks(kv: torch.Tensor, index: torch.Tensor, b: int):
    """The blocks of `b` rows (`index` = `_block_index` of their [B, nb] tables) of one layer's
    keys and values (`kv` [2, N, Hkv, bs, D], the layer's slice of the pool) as two
    [B, Hkv, nb * block_size, D] views of one gathered copy (the block and row axes merge without
    another copy). index_select copies whole [bs, D] blocks: several times faster on the CPU than
    advanced indexing, which copies element by element."""
    _, _, hkv, bs, d = kv.shape
    g = kv.transpose(1, 2).index_select(2, index)                      # [2, Hkv, B * nb, bs, D]
    g = g.view(2, hkv, b, -1, d).transpose(1, 2)                       # [2, B, Hkv, nb * bs, D]
    return g[0], g[1]


class LeanPagedDecodeAttention(_LeanRotary):
    """The paged decode step in plain torch, the same function as `PagedDecodeAttention` on the
    reference: rotary rows gathered once per step, the block gather index and the length mask
    built once per step for all layers, the cache write one indexed copy, and GQA groups folded
    into the query axis (no copy of the keys per query head). Every row is real (eager CPU steps
    have no padding rows)."""

    def __init__(self, dec, positions, cache: PagedKVCache, batch: PagedBatch):
        self.dec, self.cache = dec, cache
        b, dev = positions.shape[0], positions.device
        self.b = b
        self._init_rotary(positions[:, None])
        bs = cache.block_size
        self.write_block, self.write_row = batch.slots // bs, batch.slots % bs
        lens = batch.seq_lens.long()
        n_blocks = (int(lens.max()) + bs - 1) // bs if b else 0
        self.index = _block_index(batch.block_tables[:, :n_blocks].long())  # of [B, nb] tables
        self.n_cols = n_blocks * bs
        self.k_pos, self.q_pos = torch.arange(self.n_cols, device=dev), lens - 1
        self.visible = self.k_pos[None, :] < lens[:, None]
        self.biases = {}  # sliding window (None: none) -> score bias, made on first use

    def _bias(self, i):
        """Layer i's score bias [B, 1 | Hkv, 1 | group, n], shared by the layers with its window."""
        w = self.dec.window_of(i, self.n_cols)
        if w not in self.biases:
            self.biases[w] = _score_bias(self.dec, self.q_pos, self.k_pos, self.visible, w)
        return self.biases[w]

    def attend(self, i, q, k, v):
        kp, vp = self.cache.k[i], self.cache.v[i]
        kp[self.write_block, :, self.write_row] = k[:, 0]
        vp[self.write_block, :, self.write_row] = v[:, 0]
        return self.read(i, q).reshape(self.b, 1, -1)

    def read(self, i, q):
        """Attention of the rows' queries (any layout with the heads after the row axis) over
        their cached keys of layer i (this step's already written) -> [B, Hkv, group, D]."""
        dec, b = self.dec, self.b
        keys, values = _gather_blocks(self.cache.storage[i], self.index, b)
        qg = q.reshape(b, dec.n_kv_heads, -1, dec.head_dim)  # [B, Hkv, group, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [B, Hkv, group, n]
        scores.mul_(dec.scale)
        if dec.attn_softcap is not None:  # before the mask, as the ops do
            softcap_(scores, dec.attn_softcap)
        probs = torch.softmax(scores.add_(self._bias(i)), dim=-1)
        return torch.matmul(probs.to(values.dtype), values)


class LeanPagedPackedAttention(_LeanRotary):
    """`PagedPackedAttention` in plain torch for the CPU (used when every op resolves to the
    reference): rotary rows, write indices, and for the extend rows one padded layout, gather
    index and mask, all built once per pass for every layer. Extend rows attend as one batch: their
    queries right-aligned in [E, M] (M the most new tokens of a row), their keys gathered to
    [E, Hkv, n, D], a bottom-right causal mask over each row's length; padding cells are computed
    and thrown away. tests/engine/test_paged_engine.py holds it equal to the ops."""

    def __init__(self, dec, positions, cache: PagedKVCache, slots: torch.Tensor, n_decode: int,
                 decode: Optional[PagedBatch], extend: Optional[PagedBatch]):
        self.dec, self.cache, self.n_decode = dec, cache, n_decode
        self._init_rotary(positions[None])
        bs = cache.block_size
        self.write_block, self.write_row = slots // bs, slots % bs
        self.decode = LeanPagedDecodeAttention(dec, positions[:n_decode], cache, decode) if n_decode else None
        n_extend = positions.shape[0] - n_decode
        if n_extend:
            self._plan_extend(extend, n_extend, bs, positions.device)

    def _plan_extend(self, e: PagedBatch, n_tokens: int, bs: int, dev) -> None:
        cu, lens = e.cu_q_lens.long(), e.seq_lens.long()
        q_lens = cu[1:] - cu[:-1]
        rows, m = lens.shape[0], int(q_lens.max())
        n_blocks = (int(lens.max()) + bs - 1) // bs
        self.e_index = _block_index(e.block_tables[:, :n_blocks].long())
        # token t of row r sits at column t - cu[r] + m - q_len[r] (right-aligned)
        self.e_row = torch.repeat_interleave(torch.arange(rows, device=dev), q_lens)
        self.e_col = torch.arange(n_tokens, device=dev) - cu[self.e_row] + m - q_lens[self.e_row]
        q_pos = lens[:, None] - m + torch.arange(m, device=dev)[None, :]       # [E, M]
        k_pos = torch.arange(n_blocks * bs, device=dev)
        visible = (k_pos[None, None, :] <= q_pos[..., None]) & (k_pos[None, None, :] < lens[:, None, None])
        visible[..., 0] |= q_pos < 0  # padding cells before a row's first position: any key, unused
        self.e_plan = (q_pos, k_pos, visible)
        self.e_biases = {}  # sliding window (None: none) -> score bias, made on first use
        self.e_shape = (rows, m)

    def _extend_bias(self, i):
        """Layer i's score bias [E, 1 | Hkv, 1 | group, M, n] of the extend rows."""
        q_pos, k_pos, visible = self.e_plan
        w = self.dec.window_of(i, k_pos.shape[0])
        if w not in self.e_biases:
            self.e_biases[w] = _score_bias(self.dec, q_pos, k_pos, visible, w)
        return self.e_biases[w]

    def attend(self, i, q, k, v):
        dec = self.dec
        t, nd = q.shape[1], self.n_decode
        hq, d = dec.n_heads, dec.head_dim
        kp, vp = self.cache.k[i], self.cache.v[i]
        kp[self.write_block, :, self.write_row] = k[0]
        vp[self.write_block, :, self.write_row] = v[0]
        q = q.reshape(t, hq, d)
        parts = []
        if nd:
            parts.append(self.decode.read(i, q[:nd]).reshape(nd, hq, d))
        if t > nd:
            parts.append(self._extend_read(i, q[nd:]))
        return torch.cat(parts).reshape(1, t, -1)

    def _extend_read(self, i, q):
        dec = self.dec
        rows, m = self.e_shape
        hkv, hq, d = dec.n_kv_heads, dec.n_heads, dec.head_dim
        qp = q.new_zeros(rows, m, hq, d)
        qp[self.e_row, self.e_col] = q
        qg = qp.view(rows, m, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)  # [E, Hkv, group, M, D]
        keys, values = _gather_blocks(self.cache.storage[i], self.e_index, rows)
        keys, values = keys[:, :, None], values[:, :, None]              # [E, Hkv, 1, n, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()        # [E, Hkv, group, M, n]
        scores.mul_(dec.scale)
        if dec.attn_softcap is not None:
            softcap_(scores, dec.attn_softcap)
        probs = torch.softmax(scores.add_(self._extend_bias(i)), dim=-1)
        o = torch.matmul(probs.to(values.dtype), values)                 # [E, Hkv, group, M, D]
        o = o.permute(0, 3, 1, 2, 4).reshape(rows, m, hq, d)
        return o[self.e_row, self.e_col]
