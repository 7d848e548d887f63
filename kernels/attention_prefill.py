"""Fused prefill attention: flash-style tiled online softmax over [B, H, S, D] tensors.

Semantics are those of `fastrlhf.ops.reference.attention_prefill`: causal masks aligned
bottom-right (query i sees keys j <= i + Sk - Sq), an arbitrary [B, Sk] key mask (left
padding is the common case), GQA/MQA, fully masked query rows return 0 (never NaN); optional
softcap, sliding window, ALiBi bias and packed sequences, each a constexpr branch (a call
without it compiles the code it always did). Key tiles outside a query block's window or its
packed sequences are never loaded.

GQA: one program owns one KV head and packs its whole query group into the M dimension
(row r of the tile is query position r // G of head r % G), so every K/V tile is loaded
once for all G query heads that read it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_common import (LOG2E, alibi_log2, apply_key_rules, key_bounds, online_softmax_step,
                                query_columns, scores_log2, tile_dot)
from ._launch import Kernel, new_empty, next_pow2


@triton.jit
def _prefill_kernel(Q, K, V, O, Mask, KeyStart, LSE, SeqLo, SeqHi, Slopes,
                    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                    sob, soh, sos, sod, smb, smk,
                    n_kv_heads, seq_q, seq_k, qk_scale_log2, softcap, window,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
                    WINDOW: tl.constexpr, ALIBI: tl.constexpr, PACKED: tl.constexpr,
                    STORE_LSE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)  # int64: b * batch_stride can pass 2**31
    hkv = pid_bh % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    g = rows % GROUP
    s_q = rows // GROUP
    row_ok = s_q < seq_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + b * sqb + (hkv * GROUP + g)[:, None] * sqh + s_q[:, None] * sqs
              + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    offset = seq_k - seq_q  # bottom-right alignment: query i is key column i + offset
    cols, seq_lo, seq_hi = query_columns(s_q, row_ok, offset, SeqLo, SeqHi, PACKED)
    slope = l_i
    if ALIBI:
        slope = tl.load(Slopes + hkv * GROUP + g) * LOG2E

    # Key tiles: [start_n0, full_lo) and [full_hi, end_n) are masked per element; [full_lo,
    # full_hi) is visible to every row of this block under the causal/window/packing rules
    # (key_bounds), so it runs without that masking. Tiles outside [start_n0, end_n) are skipped.
    first_q = (pid_m * BLOCK_M) // GROUP
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seq_q - 1)
    lo_first, hi_first = key_bounds(first_q, offset, seq_k, window, SeqLo, SeqHi, CAUSAL, WINDOW, PACKED)
    lo_last, hi_last = key_bounds(last_q, offset, seq_k, window, SeqLo, SeqHi, CAUSAL, WINDOW, PACKED)
    start_n0 = (tl.maximum(lo_first, 0) // BLOCK_N) * BLOCK_N
    if HAS_MASK:
        # left padding: key tiles before the first real key of this sequence are skipped
        start_n0 = tl.maximum(start_n0, (tl.load(KeyStart + b) // BLOCK_N) * BLOCK_N)
    end_n = tl.maximum(hi_last, start_n0)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, start_n0), end_n)
    full_hi = tl.minimum(tl.maximum((hi_first // BLOCK_N) * BLOCK_N, full_lo), end_n)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for stage in tl.static_range(3):
        if stage == 0:
            lo = start_n0
            hi = full_lo
        elif stage == 1:
            lo = full_lo
            hi = full_hi
        else:
            lo = full_hi
            hi = end_n
        # without a window or packing, lo_last is 0 and stage 0 is empty: it is not compiled
        if stage != 0 or WINDOW or PACKED:
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < seq_k
                k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                            mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
                s = scores_log2(tile_dot(q, k, IEEE), qk_scale_log2, softcap, SOFTCAP)
                if ALIBI:
                    s += alibi_log2(offs_n[None, :], cols[:, None], slope[:, None])
                if stage != 1:
                    allowed = apply_key_rules(n_ok[None, :] & row_ok[:, None], offs_n[None, :], cols[:, None],
                                              seq_lo[:, None], seq_hi[:, None], window, CAUSAL, WINDOW, PACKED)
                    s = tl.where(allowed, s, float("-inf"))
                if HAS_MASK:
                    km = tl.load(Mask + b * smb + offs_n * smk, mask=n_ok, other=0)
                    s = tl.where((km != 0)[None, :], s, float("-inf"))
                p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s)
                v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, IEEE)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (O + b * sob + (hkv * GROUP + g)[:, None] * soh + s_q[:, None] * sos
              + offs_d[None, :] * sod)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        # per-row logsumexp of the scores in log2 units, for the backward (contiguous [B, Hq, Sq]);
        # +inf for a row that sees no key, so that the backward's exp2(s - lse) is 0 there
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("inf"))
        tl.store(LSE + (b * n_kv_heads * GROUP + hkv * GROUP + g) * seq_q + s_q, lse, mask=row_ok)


# Few candidates on purpose: every config is a compile (seconds) on first use per key.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
]
_kernel = Kernel(_prefill_kernel, configs=_CONFIGS,
                 key=["GROUP", "HEAD_DIM", "CAUSAL", "HAS_MASK", "SOFTCAP", "WINDOW", "ALIBI", "PACKED",
                      "STORE_LSE"],
                 interpret_meta={"BLOCK_M": 64, "BLOCK_N": 64})


def check_inputs(q, k, v, attention_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention_prefill expects q, k, v as [batch, heads, seq, head_dim]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and "
                         f"q's batch/head_dim {tuple(q.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported by the triton backend; use backend='torch'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != (b, k.shape[2]):
        raise ValueError(f"attention_mask must be [batch, seq_k] = {(b, k.shape[2])}, "
                         f"got {tuple(attention_mask.shape)}")


def check_softcap(softcap):
    if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")


def key_mask_args(attention_mask: Optional[torch.Tensor], q: torch.Tensor):
    """(mask as the kernels read it, first visible key per sequence, mask strides); q stands in
    for the tensors a kernel never reads when there is no mask."""
    mask = attention_mask
    if mask is None:
        return q, q, 0, 0
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    # index of each sequence's first visible key (0 for an all-pad row: nothing is visible)
    key_start = mask.ne(0).to(torch.int32).argmax(1).to(torch.int32)
    return mask, key_start, mask.stride(0), mask.stride(1)


def rule_args(q: torch.Tensor, window: Optional[int], alibi_slopes: Optional[torch.Tensor],
              seq_bounds: Optional[torch.Tensor]):
    """The kernels' (SeqLo, SeqHi, Slopes) pointers, window scalar and WINDOW/ALIBI/PACKED flags;
    q stands in for the tensors a kernel never reads. seq_bounds: int32 [2, T], each token's
    [start, end) of its packed sequence (`fastrlhf.ops.attention_args.packed_key_ranges`)."""
    seq_lo = seq_hi = slopes = q
    if seq_bounds is not None:
        if seq_bounds.dtype != torch.int32 or tuple(seq_bounds.shape) != (2, q.shape[2]):
            raise ValueError(f"seq_bounds must be int32 [2, {q.shape[2]}], got {seq_bounds.dtype} "
                             f"{tuple(seq_bounds.shape)}")
        seq_bounds = seq_bounds.contiguous()
        seq_lo, seq_hi = seq_bounds[0], seq_bounds[1]
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().to(torch.float32).contiguous()
    flags = dict(WINDOW=window is not None, ALIBI=alibi_slopes is not None, PACKED=seq_bounds is not None)
    return (seq_lo, seq_hi, slopes), (0 if window is None else int(window)), flags


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                      attention_mask: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, softcap: Optional[float] = None,
                      window: Optional[int] = None, alibi_slopes: Optional[torch.Tensor] = None,
                      seq_bounds: Optional[torch.Tensor] = None, return_lse: bool = False):
    """softcap: scores -> softcap * tanh(scores / softcap) before the masks (Gemma2).
    window / alibi_slopes: as in the reference. seq_bounds: packed sequences (B = 1, Sq = Sk) as
    int32 [2, T] per-token [start, end) (see `rule_args`; the ops layer derives it from cu_seqlens).

    return_lse: also return the per-row logsumexp of the scores, fp32 [B, Hq, Sq] in log2 units
    (+inf for rows that see no key), which `attention_backward` needs: returns (out, lse).
    """
    check_inputs(q, k, v, attention_mask)
    check_softcap(softcap)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = new_empty(q.shape, q.dtype, q.device)
    lse = new_empty((b, hq, sq), torch.float32, q.device) if return_lse else None
    if q.numel() == 0:
        return (out, lse) if return_lse else out
    mask_arg, key_start, smb, smk = key_mask_args(attention_mask, q)
    rule_ptrs, window_arg, flags = rule_args(q, window, alibi_slopes, seq_bounds)
    grid = lambda meta: (triton.cdiv(sq * group, meta["BLOCK_M"]), b * hkv)  # noqa: E731
    _kernel.launch(grid, q, k, v, out, mask_arg, key_start, lse if return_lse else q, *rule_ptrs,
                   *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smk,
                   hkv, sq, sk, scale * LOG2E.value,
                   float(softcap) if softcap is not None else 0.0, window_arg,
                   GROUP=group, HEAD_DIM=d, CAUSAL=bool(causal), HAS_MASK=attention_mask is not None,
                   IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None, STORE_LSE=return_lse,
                   BLOCK_D=max(16, next_pow2(d)), **flags)
    return (out, lse) if return_lse else out
