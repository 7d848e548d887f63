"""Paged attention: decode and prefill/extend over keys stored in fixed-size pool blocks.

Semantics are those of `fastrlhf.ops.paged_reference`: pools [num_blocks, Hkv, block_size, D],
block tables [B, max_blocks], seq_lens [B]; scores scaled -> softcapped -> + ALiBi -> masked
(causal, sliding window, the sequence's length) -> softmax in fp32; rows that see no key give 0.

Keys are gathered tile by tile: position n of sequence b is row n % BLOCK_SIZE of pool block
block_tables[b, n // BLOCK_SIZE], so a tile of BLOCK_N keys may span several pool blocks (or
part of one). A block id outside [0, num_blocks) makes its keys absent instead of reading out
of bounds (values are not checked on the GPU: that would sync every call).

GQA/MQA: one program owns one KV head and packs its query heads into the M dimension of the
tile (decode: the whole group; prefill: row r is query r // GROUP of head r % GROUP), so each
K/V element is read once for the whole group.

Decode is split-K: the keys of a sequence are cut into chunks of SPLIT positions aligned to
position 0; pass 1 computes each chunk's partial softmax state, pass 2 merges the chunks in
order. SPLIT, the key tile and the launch configuration are constants (never autotuned, never
chosen by batch size), so a sequence's output depends only on its own keys: bit-identical
whatever other sequences share the batch.

Prefill/extend: grid (query tile programs, B + 1, Hkv). Sequence b's query tiles are taken
by the programs of axis 0 in turn (a program loops when there are more tiles than programs),
so the grid needs no device value (max_q_len is only a hint). The extra program row b == B
writes the zeros of the padding rows from cu_q_lens[B] to T.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_common import (LOG2E, alibi_log2, apply_key_rules, merge_softmax_states, online_softmax_step,
                                scores_log2, tile_dot)
from ._launch import Kernel, new_empty, next_pow2

SPLIT_SIZE = 256  # decode: key positions per split-K chunk (fixed: see module docstring)
DECODE_TILE = 64  # decode: keys per inner step (fixed for the same reason)


@triton.jit
def _key_tile(BT, bt_row, offs_n, n_ok, num_blocks, max_blocks, BLOCK_SIZE: tl.constexpr):
    """(pool block, row in the block, present) of key positions offs_n, through the block table;
    a block id outside the pool, or a position past the table's width, makes its key absent."""
    col = offs_n // BLOCK_SIZE
    n_ok = n_ok & (col < max_blocks)
    blk = tl.load(BT + bt_row + col, mask=n_ok, other=0).to(tl.int64)
    ok = n_ok & (blk >= 0) & (blk < num_blocks)
    return blk, offs_n % BLOCK_SIZE, ok


@triton.jit
def _scores(q, k, offs_n, q_pos, slopes_log2, qk_scale_log2, softcap,
            IEEE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores of a tile in log2 units: scale, softcap, then ALiBi slope * (key pos - query pos)."""
    s = scores_log2(tile_dot(q, k, IEEE), qk_scale_log2, softcap, SOFTCAP)
    if HAS_ALIBI:
        s += alibi_log2(offs_n[None, :], q_pos[:, None], slopes_log2[:, None])
    return s


# ------------------------------------------------------------------ decode
@triton.jit
def _paged_decode_partial_kernel(Q, K, V, BT, Lens, Slopes, MidO, MidM, MidL,
                                 sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0,
                                 n_kv_heads, n_splits, num_blocks, max_blocks, window, qk_scale_log2, softcap,
                                 GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
                                 HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                                 SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)  # axis 0: B * Hkv may pass the 65535 limit of the other axes
    pid_s = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hkv = pid_bh % n_kv_heads
    length = tl.load(Lens + b).to(tl.int32)
    q_pos = length - 1
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(q_pos - window + 1, 0)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, length)
    start = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)  # whole tiles before the window skipped

    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    heads = hkv * GROUP + offs_g
    q = tl.load(Q + b * sq0 + heads[:, None] * sq1 + offs_d[None, :] * sq2,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    slopes = tl.zeros([G_PAD], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(Slopes + heads, mask=g_ok, other=0.0) * LOG2E
    q_pos_g = tl.full([G_PAD], 0, tl.int32) + q_pos

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    bt_row = b * sbt0
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < hi) & (offs_n >= first)
        blk, in_blk, n_ok = _key_tile(BT, bt_row, offs_n, n_ok, num_blocks, max_blocks, BLOCK_SIZE)
        k = tl.load(K + (blk * sk0 + hkv * sk1 + in_blk * sk2)[None, :] + offs_d[:, None] * sk3,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _scores(q, k, offs_n, q_pos_g, slopes, qk_scale_log2, softcap, IEEE, SOFTCAP, HAS_ALIBI)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s)
        v = tl.load(V + (blk * sv0 + hkv * sv1 + in_blk * sv2)[:, None] + offs_d[None, :] * sv3,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, IEEE)

    ml_off = (b * n_kv_heads * GROUP + heads) * n_splits + pid_s  # partials [B, Hq, n_splits(, D)]
    tl.store(MidM + ml_off, m_i, mask=g_ok)
    tl.store(MidL + ml_off, l_i, mask=g_ok)
    tl.store(MidO + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_decode_reduce_kernel(MidO, MidM, MidL, Lens, O, n_heads, n_splits, window, so0, so1, so2,
                                HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # b * n_heads + h
    b = (pid // n_heads).to(tl.int64)
    h = pid % n_heads
    length = tl.load(Lens + b).to(tl.int32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for sp in range(first // SPLIT, tl.cdiv(length, SPLIT)):  # in chunk order: a fixed summation
        off = pid.to(tl.int64) * n_splits + sp
        a_s = tl.load(MidO + off * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        acc, m, l = merge_softmax_states(acc, m, l, a_s, tl.load(MidM + off), tl.load(MidL + off))
    out = acc / tl.where(l > 0, l, 1.0)
    tl.store(O + b * so0 + h * so1 + offs_d * so2, out.to(O.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------ prefill / extend
@triton.jit
def _paged_prefill_kernel(Q, K, V, O, BT, CuQ, Lens, Slopes,
                          sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, so0, so1, so2, sbt0,
                          n_seqs, n_rows, n_kv_heads, num_blocks, max_blocks, window, qk_scale_log2, softcap,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          IEEE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_ALIBI: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    n_programs = tl.num_programs(0)
    b = tl.program_id(1)
    hkv = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_begin = tl.load(CuQ + b).to(tl.int64)
    if b == n_seqs:
        # rows from cu_q_lens[B] to T are padding: zeros for this KV head's query heads
        # (names differ from the other branch's: the compiler types a name once for both)
        pad_rows = ((n_rows - q_begin) * GROUP).to(tl.int32)
        for pad_tile in range(pid_m, tl.cdiv(pad_rows, BLOCK_M), n_programs):
            pr = pad_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            pt = q_begin + pr // GROUP
            ph = hkv * GROUP + pr % GROUP
            tl.store(O + pt[:, None] * so0 + ph[:, None] * so1 + offs_d[None, :] * so2,
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32).to(O.dtype.element_ty),
                     mask=(pr < pad_rows)[:, None] & d_ok[None, :])
    else:
        m_b = (tl.load(CuQ + b + 1) - q_begin).to(tl.int32)
        length = tl.load(Lens + b).to(tl.int32)
        bt_row = b.to(tl.int64) * sbt0
        for tile in range(pid_m, tl.cdiv(m_b * GROUP, BLOCK_M), n_programs):
            r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            i = r // GROUP
            heads = hkv * GROUP + r % GROUP
            row_ok = i < m_b
            q_pos = length - m_b + i
            t = q_begin + i
            q = tl.load(Q + t[:, None] * sq0 + heads[:, None] * sq1 + offs_d[None, :] * sq2,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            slopes = tl.zeros([BLOCK_M], tl.float32)
            if HAS_ALIBI:
                slopes = tl.load(Slopes + heads, mask=row_ok, other=0.0) * LOG2E
            last_pos = length - m_b + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, m_b - 1)
            hi = last_pos + 1  # bottom-right causal: no key after the tile's last query
            lo = 0
            if HAS_WINDOW:
                first_pos = length - m_b + (tile * BLOCK_M) // GROUP
                lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                blk, in_blk, n_ok = _key_tile(BT, bt_row, offs_n, offs_n < hi, num_blocks, max_blocks,
                                              BLOCK_SIZE)
                k = tl.load(K + (blk * sk0 + hkv * sk1 + in_blk * sk2)[None, :] + offs_d[:, None] * sk3,
                            mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                s = _scores(q, k, offs_n, q_pos, slopes, qk_scale_log2, softcap, IEEE, SOFTCAP, HAS_ALIBI)
                seen = apply_key_rules(n_ok[None, :] & row_ok[:, None], offs_n[None, :], q_pos[:, None], 0, 0,
                                       window, True, HAS_WINDOW, False)
                s = tl.where(seen, s, float("-inf"))
                p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s)
                v = tl.load(V + (blk * sv0 + hkv * sv1 + in_blk * sv2)[:, None] + offs_d[None, :] * sv3,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, IEEE)
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(O + t[:, None] * so0 + heads[:, None] * so1 + offs_d[None, :] * so2,
                     out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------ KV append
@triton.jit
def _paged_append_kernel(KP, VP, K, V, Slots, n_tokens, n_slots, sp0, sp1, sp2, sp3, svp0, svp1, svp2, svp3,
                         sk0, sk1, sk2, sv0, sv1, sv2,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < n_tokens
    slot = tl.load(Slots + offs_t, mask=t_ok, other=-1).to(tl.int64)
    # slots < 0 are padding rows; a slot past the pool is dropped rather than written out of bounds
    ok = (t_ok & (slot >= 0) & (slot < n_slots))[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    t64 = offs_t.to(tl.int64)
    k = tl.load(K + t64[:, None] * sk0 + h * sk1 + offs_d[None, :] * sk2, mask=ok)
    v = tl.load(V + t64[:, None] * sv0 + h * sv1 + offs_d[None, :] * sv2, mask=ok)
    tl.store(KP + (blk * sp0 + h * sp1 + off * sp2)[:, None] + offs_d[None, :] * sp3,
             k.to(KP.dtype.element_ty), mask=ok)
    tl.store(VP + (blk * svp0 + h * svp1 + off * svp2)[:, None] + offs_d[None, :] * svp3,
             v.to(VP.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------ launches
_decode_partial = Kernel(_paged_decode_partial_kernel)
_decode_reduce = Kernel(_paged_decode_reduce_kernel)
# Few candidates on purpose: every config is a compile on first use per key.
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
]
_prefill = Kernel(_paged_prefill_kernel, configs=_PREFILL_CONFIGS,
                  key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "SOFTCAP", "HAS_WINDOW", "HAS_ALIBI"],
                  interpret_meta={"BLOCK_M": 32, "BLOCK_N": 32})
_append = Kernel(_paged_append_kernel)

MAX_HEAD_DIM = 256


def check_supported(q: torch.Tensor, k_pool: torch.Tensor, op: str) -> None:
    """What these kernels cannot do (shapes and dtypes are checked by the ops layer first)."""
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the triton "
                         "backend; use backend='torch'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: the triton kernels take fp16/bf16/fp32, got {q.dtype}")


def _score_args(q, k_pool, scale, softcap, window, alibi_slopes):
    """(launch arguments, constexprs) shared by decode and prefill."""
    hq, d = q.shape[1], q.shape[2]
    hkv, block_size = k_pool.shape[1], k_pool.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    slopes = q if alibi_slopes is None else alibi_slopes.to(q.device, torch.float32).contiguous()
    meta = dict(GROUP=hq // hkv, HEAD_DIM=d, BLOCK_SIZE=block_size, IEEE=q.dtype == torch.float32,
                SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, HAS_ALIBI=alibi_slopes is not None,
                BLOCK_D=max(16, next_pow2(d)))
    scalars = (0 if window is None else int(window), scale * LOG2E.value,
               0.0 if softcap is None else float(softcap))
    return slopes, scalars, meta


def _table(block_tables: torch.Tensor, device) -> torch.Tensor:
    bt = block_tables.to(device)
    return bt if bt.stride(1) == 1 else bt.contiguous()  # rows are read with a unit stride


def paged_attention_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: Optional[float] = None,
                           softcap: Optional[float] = None, window: Optional[int] = None,
                           alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_supported(q, k_pool, "paged_attention_decode")
    b, hq, d = q.shape
    num_blocks, hkv, block_size, _ = k_pool.shape
    out = new_empty(q.shape, q.dtype, q.device)
    if q.numel() == 0:
        return out
    n_splits = max(1, triton.cdiv(block_tables.shape[1] * block_size, SPLIT_SIZE))
    mid_o = new_empty((b, hq, n_splits, d), torch.float32, q.device)
    mid_m = new_empty((b, hq, n_splits), torch.float32, q.device)
    mid_l = new_empty((b, hq, n_splits), torch.float32, q.device)
    lens = seq_lens.to(q.device).contiguous()
    table = _table(block_tables, q.device)
    slopes, (window_arg, qk_scale_log2, cap), meta = _score_args(q, k_pool, scale, softcap, window, alibi_slopes)
    group = meta["GROUP"]
    _decode_partial.launch(lambda _: (b * hkv, n_splits), q, k_pool, v_pool, table, lens, slopes,
                           mid_o, mid_m, mid_l, *q.stride(), *k_pool.stride(), *v_pool.stride(), table.stride(0),
                           hkv, n_splits, num_blocks, table.shape[1], window_arg, qk_scale_log2, cap,
                           G_PAD=max(16, next_pow2(group)), SPLIT=SPLIT_SIZE, BLOCK_N=DECODE_TILE,
                           num_warps=4, num_stages=2, **meta)
    _decode_reduce.launch(lambda _: (b * hq,), mid_o, mid_m, mid_l, lens, out, hq, n_splits, window_arg,
                          *out.stride(), HEAD_DIM=d, HAS_WINDOW=window is not None, SPLIT=SPLIT_SIZE,
                          BLOCK_D=meta["BLOCK_D"], num_warps=1)
    return out


def paged_attention_prefill(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, *,
                            max_q_len: Optional[int] = None, scale: Optional[float] = None,
                            softcap: Optional[float] = None, window: Optional[int] = None,
                            alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_supported(q, k_pool, "paged_attention_prefill")
    t, hq, d = q.shape
    num_blocks, hkv, _, _ = k_pool.shape
    n_seqs = seq_lens.shape[0]
    if n_seqs >= 65535:  # grid axis 1 (sequences + the padding row) has a 65535 limit
        raise ValueError(f"paged_attention_prefill: {n_seqs} sequences in one call; the triton kernel takes "
                         "at most 65534, split the call")
    out = new_empty(q.shape, q.dtype, q.device)
    if q.numel() == 0:
        return out
    bound = t if max_q_len is None else min(int(max_q_len), t)
    lens = seq_lens.to(q.device).contiguous()
    cu = cu_q_lens.to(q.device).contiguous()
    table = _table(block_tables, q.device)
    slopes, (window_arg, qk_scale_log2, cap), meta = _score_args(q, k_pool, scale, softcap, window, alibi_slopes)
    group = meta["GROUP"]
    grid = lambda m: (max(1, triton.cdiv(bound * group, m["BLOCK_M"])), n_seqs + 1, hkv)  # noqa: E731
    _prefill.launch(grid, q, k_pool, v_pool, out, table, cu, lens, slopes,
                    *q.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride(), table.stride(0),
                    n_seqs, t, hkv, num_blocks, table.shape[1], window_arg, qk_scale_log2, cap, **meta)
    return out


def paged_kv_append(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    n_tokens = k.shape[0]
    num_blocks, hkv, block_size, d = k_pool.shape
    if n_tokens == 0:
        return
    slots = slot_mapping.to(k_pool.device).contiguous()
    block_t = 16
    _append.launch(lambda _: (triton.cdiv(n_tokens, block_t), hkv), k_pool, v_pool, k, v, slots, n_tokens,
                   num_blocks * block_size, *k_pool.stride(), *v_pool.stride(), *k.stride(), *v.stride(),
                   HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_T=block_t, BLOCK_D=next_pow2(d), num_warps=4)
