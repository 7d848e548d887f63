"""KV-cache decode attention: one query token per sequence, split-K over the cache.

Pass 1 splits each sequence's cache into chunks of SPLIT_SIZE positions aligned to absolute
cache position 0; one program per (chunk, batch, KV head) computes the unnormalised partial
softmax (running max m, sum l, weighted values acc) for the KV head's whole query group, so
each K/V element is read once. Pass 2 combines the chunks of a sequence in chunk order.

Both the chunk size and the inner tile are constants, never autotuned: the arithmetic for a
sequence then depends only on its own (cache_starts, cache_lens), not on the batch it is in,
the cache capacity or the GPU, so rollout log-probs are reproducible. There is deliberately
no one-pass variant for large batches: switching on batch size would change the summation
order, and a large batch simply launches more chunk programs.

A sliding window raises a sequence's first visible column to cache_lens - window (the chunks
and tiles before it are skipped, as those before cache_starts); an ALiBi bias is added to the
scores of each head (constexpr branches, as the softcap).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._attention_common import (LOG2E, alibi_log2, merge_softmax_states, online_softmax_step, scores_log2,
                                tile_dot)
from ._launch import Kernel, new_empty, next_pow2
from .attention_prefill import check_softcap

SPLIT_SIZE = 256  # cache positions per chunk (fixed: see module docstring)
TILE_N = 64       # positions per inner step inside a chunk (fixed for the same reason)


@triton.jit
def _first_visible(Starts, s_starts, b, end, window, HAS_STARTS: tl.constexpr, WINDOW: tl.constexpr):
    """First visible cache column of sequence b: its start, raised to end - window by a window."""
    start = end * 0
    if HAS_STARTS:
        start = tl.load(Starts + b * s_starts).to(tl.int32)
    if WINDOW:
        start = tl.maximum(start, end - window)
    return start


@triton.jit
def _decode_partial_kernel(Q, K, V, Lens, Starts, s_lens, s_starts, MidO, MidM, MidL, Slopes,
                           sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                           n_kv_heads, n_splits, qk_scale_log2, softcap, window,
                           GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HAS_STARTS: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
                           WINDOW: tl.constexpr, ALIBI: tl.constexpr,
                           SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)  # int64: b * batch_stride can pass 2**31
    hkv = pid_bh % n_kv_heads
    end = tl.load(Lens + b * s_lens).to(tl.int32)  # lens/starts may be expanded (stride 0)
    start = _first_visible(Starts, s_starts, b, end, window, HAS_STARTS, WINDOW)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, end)
    # skip whole tiles before `start`: a fully masked tile leaves (m, l, acc) unchanged
    first = tl.maximum(lo, (start // BLOCK_N) * BLOCK_N)

    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + (hkv * GROUP + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    slope = l_i
    if ALIBI:
        slope = tl.load(Slopes + hkv * GROUP + offs_g, mask=g_ok, other=0.0) * LOG2E
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for start_n in range(first, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < hi) & (offs_n >= start)
        k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = scores_log2(tile_dot(q, k, IEEE), qk_scale_log2, softcap, SOFTCAP)
        if ALIBI:  # the query is column end - 1
            s += alibi_log2(offs_n[None, :], end - 1, slope[:, None])
        s = tl.where(n_ok[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, s)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, IEEE)

    # partials laid out [B, Hq, n_splits(, D)], contiguous
    head = b * n_kv_heads * GROUP + hkv * GROUP + offs_g
    ml_off = head * n_splits + pid_s
    tl.store(MidM + ml_off, m_i, mask=g_ok)
    tl.store(MidL + ml_off, l_i, mask=g_ok)
    tl.store(MidO + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(MidO, MidM, MidL, Lens, Starts, s_lens, s_starts, O, n_heads, n_splits,
                          sob, soh, sod, window,
                          HEAD_DIM: tl.constexpr, HAS_STARTS: tl.constexpr, WINDOW: tl.constexpr,
                          SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # b * n_heads + h
    b = (pid // n_heads).to(tl.int64)
    h = pid % n_heads
    end = tl.load(Lens + b * s_lens).to(tl.int32)  # lens/starts may be expanded (stride 0)
    start = _first_visible(Starts, s_starts, b, end, window, HAS_STARTS, WINDOW)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for sp in range(start // SPLIT, tl.cdiv(end, SPLIT)):
        off = pid * n_splits + sp
        m_s = tl.load(MidM + off)
        l_s = tl.load(MidL + off)
        a_s = tl.load(MidO + off * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        acc, m, l = merge_softmax_states(acc, m, l, a_s, m_s, l_s)
    out = acc / tl.where(l > 0, l, 1.0)
    tl.store(O + b * sob + h * soh + offs_d * sod, out.to(O.dtype.element_ty), mask=d_ok)


_WARPS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 3), (8, 2)]]
_partial = Kernel(_decode_partial_kernel, configs=_WARPS, key=["GROUP", "HEAD_DIM", "SOFTCAP", "WINDOW", "ALIBI"],
                  interpret_meta={})
_reduce = Kernel(_decode_reduce_kernel)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_lens: torch.Tensor, *, cache_starts: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softcap: scores -> softcap * tanh(scores / softcap) before the masks (Gemma2).
    window: the query (column cache_lens[b] - 1) sees columns > cache_lens[b] - 1 - window; the
    chunks before that are skipped. alibi_slopes [Hq]: + slope * (j - (cache_lens[b] - 1))."""
    check_softcap(softcap)
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("attention_decode expects q [B, Hq, D] and equal caches [B, Hkv, Smax, D]; "
                         f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    _, hkv, smax, dk = k_cache.shape
    if k_cache.shape[0] != b or dk != d:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch/head_dim")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported by the triton backend; use backend='torch'")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise TypeError(f"q and caches must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if cache_lens.shape != (b,) or (cache_starts is not None and cache_starts.shape != (b,)):
        raise ValueError(f"cache_lens / cache_starts must be int tensors of shape [{b}]")
    if cache_lens.is_floating_point() or (cache_starts is not None and cache_starts.is_floating_point()):
        raise TypeError("cache_lens / cache_starts must be integer tensors")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = new_empty(q.shape, q.dtype, q.device)
    if q.numel() == 0:
        return out
    n_splits = triton.cdiv(smax, SPLIT_SIZE)
    mid_o = new_empty((b, hq, n_splits, d), torch.float32, q.device)
    mid_m = new_empty((b, hq, n_splits), torch.float32, q.device)
    mid_l = new_empty((b, hq, n_splits), torch.float32, q.device)
    lens = cache_lens.to(q.device)
    starts = cache_starts.to(q.device) if cache_starts is not None else lens
    block_d = max(16, next_pow2(d))
    has_starts = cache_starts is not None
    slopes = q if alibi_slopes is None else alibi_slopes.detach().to(torch.float32).contiguous()
    window_arg = 0 if window is None else int(window)
    _partial.launch(lambda meta: (n_splits, b * hkv), q, k_cache, v_cache, lens, starts,
                    lens.stride(0), starts.stride(0), mid_o, mid_m, mid_l, slopes,
                    *q.stride(), *k_cache.stride(), *v_cache.stride(),
                    hkv, n_splits, scale * LOG2E.value,
                    float(softcap) if softcap is not None else 0.0, window_arg,
                    GROUP=group, G_PAD=max(16, next_pow2(group)), HEAD_DIM=d,
                    HAS_STARTS=has_starts, IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None,
                    WINDOW=window is not None, ALIBI=alibi_slopes is not None,
                    SPLIT=SPLIT_SIZE, BLOCK_N=TILE_N, BLOCK_D=block_d)
    _reduce.launch(lambda meta: (b * hq,), mid_o, mid_m, mid_l, lens, starts, lens.stride(0),
                   starts.stride(0), out, hq, n_splits,
                   *out.stride(), window_arg, HEAD_DIM=d, HAS_STARTS=has_starts, WINDOW=window is not None,
                   SPLIT=SPLIT_SIZE, BLOCK_D=block_d, num_warps=1)
    return out
