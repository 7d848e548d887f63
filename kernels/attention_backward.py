"""Backward of the fused prefill attention (kernels/attention_prefill.py), FlashAttention-2 style.

The forward saves one number per query row, the logsumexp of its scores (log2 units, +inf for
a row that sees no key). The backward recomputes each probability tile from it,
p = exp2(s - lse), instead of storing the [Sq, Sk] probabilities, and with
delta_i = Σ_d dO_i·O_i (a small preprocessing kernel) the score gradient is
ds = p · (dO·vᵀ - delta) (times d(score)/d(q·k): the scale, and 1 - tanh² under a softcap).

Two kernels, no atomics, so gradients are bit-reproducible:
- `_dkdv_kernel`: one program per (key block, batch, KV head) accumulates dk = Σ dsᵀ·q and
  dv = Σ pᵀ·dO over every query row that can see its keys. As in the forward, the rows of a
  tile are (query position, query head of the group) pairs, so the program sums the whole
  GQA/MQA group into its KV head's gradient in registers.
- `_dq_kernel`: one program per (query block, batch, KV head), laid out as the forward, sums
  dq = Σ ds·k over the visible key tiles.
Masks are the forward's: causal aligned bottom-right, an arbitrary [B, Sk] key mask (tiles
before a left-padded sequence's first key, and key blocks with no visible key, are skipped),
a sliding window and packed sequences (tiles outside them skipped in both kernels); an ALiBi
bias is added to the recomputed scores (after the softcap, whose derivative is taken on the
capped score without the bias); rows with no visible key get exactly zero gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_common import (LOG2E, alibi_log2, apply_key_rules, key_bounds, query_columns, scores_log2,
                                tile_dot)
from ._launch import Kernel, new_empty, next_pow2
from .attention_prefill import key_mask_args, rule_args


@triton.jit
def _delta_kernel(O, DO, Delta, n_heads, seq_q, sob, soh, sos, sod, sdb, sdh, sds, sdd,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Delta[b, h, i] = Σ_d O·dO in fp32 (contiguous [B, H, Sq])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sds + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def _score_grad(p, dp, delta, s, softcap, SOFTCAP: tl.constexpr):
    """Gradient w.r.t. the (scaled) product q·k·scale of the loss, from the recomputed
    probabilities p, dp = dO·vᵀ and delta (rows along the delta axis given by the caller's
    broadcast). s is the score in log2 units: softcap·tanh(·)·log2e under SOFTCAP."""
    ds = p * (dp - delta)
    if SOFTCAP:
        t = s * (1.0 / (softcap * LOG2E))  # the tanh itself
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, Mask, KeyStart, SeqLo, SeqHi, Slopes,
                 sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                 sdob, sdoh, sdos, sdod, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, smb, smk,
                 n_kv_heads, seq_q, seq_k, qk_scale_log2, scale, softcap, window,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_MASK: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
                 WINDOW: tl.constexpr, ALIBI: tl.constexpr, PACKED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hkv = pid_bh % n_kv_heads

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seq_k
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    offset = seq_k - seq_q  # bottom-right alignment: query i sees keys j <= i + offset
    key_ok = n_ok
    # The queries that can see a key of this block form one range [first_q, end_q) (the key
    # bounds of a query are non-decreasing in it; see _attention_common.key_bounds); in packed
    # rows (offset 0) a key's own sequence is exactly the queries that may see it.
    key_first = pid_n * BLOCK_N
    key_last = tl.minimum(key_first + BLOCK_N - 1, seq_k - 1)
    first_q = key_first * 0
    end_q = first_q + seq_q
    if CAUSAL:
        first_q = tl.maximum(key_first - offset, 0)
        if HAS_MASK:
            # under left padding the rows before the first real key see nothing
            first_q = tl.maximum(first_q, tl.load(KeyStart + b) - offset)
    if WINDOW:
        end_q = tl.minimum(end_q, key_last - offset + window)
    if PACKED:
        first_q = tl.maximum(first_q, tl.load(SeqLo + key_first))
        end_q = tl.minimum(end_q, tl.load(SeqHi + key_last))
    # packed rows r = query position * GROUP + head in group
    hi = tl.maximum(end_q, 0) * GROUP
    lo = tl.minimum((first_q * GROUP // BLOCK_M) * BLOCK_M, hi)
    if HAS_MASK:
        km = tl.load(Mask + b * smb + offs_n * smk, mask=n_ok, other=0)
        key_ok = key_ok & (km != 0)
        # a block of padding keys only needs its zero gradients written
        hi = tl.where(tl.max(key_ok.to(tl.int32), 0) > 0, hi, lo)

    q_base = Q + b * sqb + hkv * GROUP * sqh
    do_base = DO + b * sdob + hkv * GROUP * sdoh
    row_base = (b * n_kv_heads + hkv) * GROUP * seq_q  # LSE/Delta are contiguous [B, Hq, Sq]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        g = rows % GROUP
        s_q = rows // GROUP
        row_ok = s_q < seq_q
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + g[:, None] * sqh + s_q[:, None] * sqs + offs_d[None, :] * sqd,
                    mask=qd_ok, other=0.0)
        lse = tl.load(LSE + row_base + g * seq_q + s_q, mask=row_ok, other=float("inf"))
        s_t = scores_log2(tile_dot(k, tl.trans(q), IEEE), qk_scale_log2, softcap, SOFTCAP)  # [N, M]
        cols, seq_lo, seq_hi = query_columns(s_q, row_ok, offset, SeqLo, SeqHi, PACKED)
        biased = s_t
        if ALIBI:
            slope = tl.load(Slopes + hkv * GROUP + g) * LOG2E
            biased = s_t + alibi_log2(offs_n[:, None], cols[None, :], slope[None, :])
        allowed = apply_key_rules(key_ok[:, None] & row_ok[None, :], offs_n[:, None], cols[None, :],
                                  seq_lo[None, :], seq_hi[None, :], window, CAUSAL, WINDOW, PACKED)
        # masked before the exp2: a hidden key's score may be far above the row's logsumexp
        p_t = tl.math.exp2(tl.where(allowed, biased - lse[None, :], float("-inf")))
        do = tl.load(do_base + g[:, None] * sdoh + s_q[:, None] * sdos + offs_d[None, :] * sdod,
                     mask=qd_ok, other=0.0)
        dv += tile_dot(p_t.to(do.dtype), do, IEEE)
        dp_t = tile_dot(v, tl.trans(do), IEEE)
        delta = tl.load(Delta + row_base + g * seq_q + s_q, mask=row_ok, other=0.0)
        ds_t = _score_grad(p_t, dp_t, delta[None, :], s_t, softcap, SOFTCAP)
        dk += tile_dot(ds_t.to(q.dtype), q, IEEE)

    dk = dk * scale
    tl.store(DK + b * sdkb + hkv * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sdvb + hkv * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, Delta, DQ, Mask, KeyStart, SeqLo, SeqHi, Slopes,
               sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
               sdob, sdoh, sdos, sdod, sdqb, sdqh, sdqs, sdqd, smb, smk,
               n_kv_heads, seq_q, seq_k, qk_scale_log2, scale, softcap, window,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_MASK: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
               WINDOW: tl.constexpr, ALIBI: tl.constexpr, PACKED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hkv = pid_bh % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    g = rows % GROUP
    s_q = rows // GROUP
    row_ok = s_q < seq_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qd_ok = row_ok[:, None] & d_ok[None, :]
    h = hkv * GROUP + g
    q = tl.load(Q + b * sqb + h[:, None] * sqh + s_q[:, None] * sqs + offs_d[None, :] * sqd,
                mask=qd_ok, other=0.0)
    do = tl.load(DO + b * sdob + h[:, None] * sdoh + s_q[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=qd_ok, other=0.0)
    row_idx = (b * n_kv_heads * GROUP + h) * seq_q + s_q
    lse = tl.load(LSE + row_idx, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_idx, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    offset = seq_k - seq_q
    cols, seq_lo, seq_hi = query_columns(s_q, row_ok, offset, SeqLo, SeqHi, PACKED)
    slope = lse
    if ALIBI:
        slope = tl.load(Slopes + h) * LOG2E
    # the keys of this block of queries: [lo of its first query, hi of its last) (key_bounds)
    first_q = (pid_m * BLOCK_M) // GROUP
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seq_q - 1)
    lo, _ = key_bounds(first_q, offset, seq_k, window, SeqLo, SeqHi, CAUSAL, WINDOW, PACKED)
    _, hi = key_bounds(last_q, offset, seq_k, window, SeqLo, SeqHi, CAUSAL, WINDOW, PACKED)
    hi = tl.maximum(hi, 0)
    lo = tl.minimum((tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N, hi)
    if HAS_MASK:
        lo = tl.maximum(lo, tl.minimum((tl.load(KeyStart + b) // BLOCK_N) * BLOCK_N, hi))
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
        s = scores_log2(tile_dot(q, tl.trans(k), IEEE), qk_scale_log2, softcap, SOFTCAP)  # [M, N]
        biased = s
        if ALIBI:
            biased = s + alibi_log2(offs_n[None, :], cols[:, None], slope[:, None])
        allowed = apply_key_rules(n_ok[None, :] & row_ok[:, None], offs_n[None, :], cols[:, None],
                                  seq_lo[:, None], seq_hi[:, None], window, CAUSAL, WINDOW, PACKED)
        if HAS_MASK:
            km = tl.load(Mask + b * smb + offs_n * smk, mask=n_ok, other=0)
            allowed = allowed & (km != 0)[None, :]
        p = tl.math.exp2(tl.where(allowed, biased - lse[:, None], float("-inf")))
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
        dp = tile_dot(do, tl.trans(v), IEEE)
        ds = _score_grad(p, dp, delta[:, None], s, softcap, SOFTCAP)
        dq += tile_dot(ds.to(k.dtype), k, IEEE)

    dq = dq * scale
    tl.store(DQ + b * sdqb + h[:, None] * sdqh + s_q[:, None] * sdqs + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qd_ok)


def _configs(pairs):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in pairs]


_KEY = ["GROUP", "HEAD_DIM", "CAUSAL", "HAS_MASK", "SOFTCAP", "WINDOW", "ALIBI", "PACKED"]
# Few candidates: every config is a compile on first use per key. dk/dv hold two [BLOCK_N, D]
# fp32 accumulators; dq one [BLOCK_M, D]. Head dim 256 needs the smaller tiles.
_delta = Kernel(_delta_kernel)
_dkdv = Kernel(_dkdv_kernel, configs=_configs([(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2),
                                               (32, 64, 4, 2)]),
               key=_KEY, interpret_meta={"BLOCK_M": 64, "BLOCK_N": 64})
_dq = Kernel(_dq_kernel, configs=_configs([(128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2),
                                           (64, 32, 4, 2)]),
             key=_KEY, interpret_meta={"BLOCK_M": 64, "BLOCK_N": 64})
# Wide rows (head dim 256, or fp32 operands past 128): small tiles only; the big ones spill
# registers and take minutes to compile.
_dkdv_wide = Kernel(_dkdv_kernel, configs=_configs([(32, 64, 4, 1), (16, 64, 4, 1)]),
                    key=_KEY, interpret_meta={"BLOCK_M": 64, "BLOCK_N": 64})
_dq_wide = Kernel(_dq_kernel, configs=_configs([(64, 32, 4, 1), (32, 32, 4, 1)]),
                  key=_KEY, interpret_meta={"BLOCK_M": 64, "BLOCK_N": 64})


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, *, causal: bool = True,
                       attention_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       softcap: Optional[float] = None, window: Optional[int] = None,
                       alibi_slopes: Optional[torch.Tensor] = None, seq_bounds: Optional[torch.Tensor] = None):
    """(dq, dk, dv) of `attention_prefill` given dL/dout, the forward's output and its lse
    (`attention_prefill(..., return_lse=True)`), called with the forward's arguments. dk, dv are
    per KV head (GQA groups summed); the alibi slopes get no gradient (constants)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"attention_backward: grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} "
                         f"must have q's shape {tuple(q.shape)}")
    if lse.shape != (b, hq, sq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention_backward: lse must be contiguous float32 [{b}, {hq}, {sq}] (the forward's "
                         f"return_lse output); got {lse.dtype} {tuple(lse.shape)}")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grad_out = grad_out.to(q.dtype)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk = new_empty(k.shape, k.dtype, k.device)
    dv = new_empty(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = max(16, next_pow2(d))
    delta = new_empty((b, hq, sq), torch.float32, q.device)
    _delta.launch(lambda meta: (triton.cdiv(sq, 64), b * hq), out, grad_out, delta, hq, sq,
                  *out.stride(), *grad_out.stride(), HEAD_DIM=d, BLOCK_M=64, BLOCK_D=block_d,
                  num_warps=4)
    mask_arg, key_start, smb, smk = key_mask_args(attention_mask, q)
    rule_ptrs, window_arg, flags = rule_args(q, window, alibi_slopes, seq_bounds)
    common = dict(GROUP=group, HEAD_DIM=d, CAUSAL=bool(causal), HAS_MASK=attention_mask is not None,
                  IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None, BLOCK_D=block_d, **flags)
    scalars = (hkv, sq, sk, scale * LOG2E.value, scale, float(softcap) if softcap is not None else 0.0,
               window_arg)
    wide = block_d > 128 or (block_d > 64 and q.dtype == torch.float32)
    dkdv, dq_kernel = (_dkdv_wide, _dq_wide) if wide else (_dkdv, _dq)
    dkdv.launch(lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * hkv),
                 q, k, v, grad_out, lse, delta, dk, dv, mask_arg, key_start, *rule_ptrs,
                 *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
                 smb, smk, *scalars, **common)
    dq_kernel.launch(lambda meta: (triton.cdiv(sq * group, meta["BLOCK_M"]), b * hkv),
               q, k, v, grad_out, lse, delta, dq, mask_arg, key_start, *rule_ptrs,
               *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
               smb, smk, *scalars, **common)
    return dq, dk, dv
