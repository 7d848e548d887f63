"""The `torch` backend: plain PyTorch implementations of every op.

These are the ground truth of every kernel test and the fallback on machines with neither
a GPU nor Triton. They favour clarity over speed, compute in fp32 (softmax, norms, rotary)
and return the input dtype. Shapes and semantics are documented in `fastrlhf.ops`.
"""
from __future__ import annotations

import math

import torch

from . import attention_args as args
from .logprobs_reference import token_logprobs  # noqa: F401  (chunked; its own module)
from .paged_reference import (  # noqa: F401  (the paged KV-cache ops; their own module)
    paged_attention_decode, paged_attention_prefill, paged_kv_append)


def _expand_kv(k: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Repeat KV heads so GQA/MQA can be computed as plain multi-head attention."""
    n_kv = k.shape[1]
    if n_kv == n_q_heads:
        return k
    if n_q_heads % n_kv:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of KV heads ({n_kv})")
    return k.repeat_interleave(n_q_heads // n_kv, dim=1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (so float64 tests check the reference at full precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attend(q, k, v, scale, softcap, bias, allowed):
    """softmax(scores) v with scores = q kᵀ·scale -> softcap -> + bias -> masked by `allowed`
    ([B, 1 or H, Sq, Sk] bool); rows that see no key give 0, never NaN."""
    cdt = _compute_dtype(q)
    hq = q.shape[1]
    kf = _expand_kv(k, hq).to(cdt)
    vf = _expand_kv(v, hq).to(cdt)
    scores = torch.matmul(q.to(cdt), kf.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)


def _alibi_bias(alibi_slopes, q_cols, k_cols, dtype):
    """slope[h] * (key column - query column): [1 or B, H, Sq, Sk] for q_cols [1 or B, Sq]."""
    dist = (k_cols[:, None, :] - q_cols[:, :, None]).to(dtype)  # [., Sq, Sk]
    return alibi_slopes.to(dtype)[None, :, None, None] * dist[:, None]


def attention_prefill(q, k, v, *, causal=True, attention_mask=None, scale=None, softcap=None, window=None,
                      alibi_slopes=None, cu_seqlens=None):
    """softmax(q kᵀ·scale + bias + mask) v over [B, H, S, D] tensors; fully masked rows give 0.

    Order: scores -> softcap (softcap·tanh(scores / softcap), Gemma2) -> + alibi
    (slope[h]·(key column - query column)) -> masks (causal bottom-right, padding, window, packing).
    window: query column p sees key columns p - window < j <= p (causal only).
    cu_seqlens: int [N + 1], sequences packed in the one row of q/k/v (B = 1, Sq = Sk); a token
    sees only its own sequence's keys; tokens past cu_seqlens[-1] see nothing.
    """
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    window = args.check_window(window)
    args.check_causal_window(causal, window)
    args.check_alibi(alibi_slopes, hq, q.device)
    args.check_packed(q, k, attention_mask, cu_seqlens)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_cols = torch.arange(sq, device=q.device) + (sk - sq)  # bottom-right: the last query sees every key
    k_cols = torch.arange(sk, device=q.device)
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = k_cols[None, :] <= q_cols[:, None]
    if window is not None:
        allowed = allowed & (k_cols[None, :] > q_cols[:, None] - window)
    if cu_seqlens is not None:
        start, end = args.packed_key_ranges(cu_seqlens, sk)
        allowed = allowed & (k_cols[None, :] >= start[:, None]) & (k_cols[None, :] < end[:, None])
    allowed = allowed[None, None].expand(b, 1, sq, sk)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
    bias = None
    if alibi_slopes is not None:
        bias = _alibi_bias(alibi_slopes, q_cols[None], k_cols[None], _compute_dtype(q))
    return _attend(q, k, v, scale, softcap, bias, allowed)


def attention_decode(q, k_cache, v_cache, cache_lens, *, cache_starts=None, scale=None, softcap=None,
                     window=None, alibi_slopes=None):
    """One query token per sequence over cache positions [cache_starts[b], cache_lens[b]).

    The query is column cache_lens[b] - 1: window keeps columns > cache_lens[b] - 1 - window, and
    alibi adds slope[h]·(j - (cache_lens[b] - 1)).
    """
    b, hq, d = q.shape
    smax = k_cache.shape[2]
    window = args.check_window(window)
    args.check_alibi(alibi_slopes, hq, q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = torch.arange(smax, device=q.device)[None, :]
    lens = cache_lens.to(q.device).long()[:, None]
    valid = pos < lens
    if cache_starts is not None:
        valid = valid & (pos >= cache_starts.to(q.device).long()[:, None])
    if window is not None:
        valid = valid & (pos > lens - 1 - window)
    bias = None
    if alibi_slopes is not None:
        bias = _alibi_bias(alibi_slopes, lens - 1, pos.expand(b, smax), _compute_dtype(q))
    out = _attend(q[:, :, None, :], k_cache, v_cache, scale, softcap, bias, valid[:, None, None, :])
    return out[:, :, 0, :]


def kv_cache_append(k_cache, v_cache, k, v, positions):
    """Write k/v [B, Hkv, T, D] into the caches at [positions[b], positions[b] + T), in place."""
    t = k.shape[2]
    idx = positions.to(k_cache.device).long()[:, None] + torch.arange(t, device=k_cache.device)[None, :]
    bidx = torch.arange(k.shape[0], device=k_cache.device)[:, None].expand_as(idx)
    # advanced indexing on dims (0, 2): the value layout is [B, T, H, D]
    k_cache[bidx, :, idx] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[bidx, :, idx] = v.transpose(1, 2).to(v_cache.dtype)
    return k_cache, v_cache


def lora_linear(x, weight, bias, lora_a, lora_b, scaling):
    """x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ; differentiable through every tensor argument."""
    out = torch.nn.functional.linear(x, weight, bias)
    if lora_a is not None and scaling != 0:
        out = out + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)
    return out


def lora_fuse(weight, lora_a, lora_b, scaling, *, out=None):
    """W + scaling·B·A computed in fp32, rounded once to W's dtype; `out=weight` is in place."""
    delta = torch.matmul(lora_b.float(), lora_a.float()) * scaling
    res = (weight.float() + delta).to(weight.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


def lora_unfuse(weight, lora_a, lora_b, scaling, *, out=None):
    """Inverse of lora_fuse (exact only in fp32 arithmetic; the engine keeps a backup in bf16)."""
    return lora_fuse(weight, lora_a, lora_b, -scaling, out=out)


def rms_norm(x, weight, eps=1e-6, residual=None):
    if x.dtype == torch.float32 and (residual is None or residual.dtype == torch.float32) and (
            weight is None or weight.dtype == torch.float32):
        # fp32 throughout: torch's rms_norm computes the same expression (x * rsqrt(mean(x^2) + eps)
        # * weight, bit for bit: tests/ops/test_ops_reference.py) in one call instead of seven
        h = x if residual is None else x + residual
        y = torch.nn.functional.rms_norm(h, (h.shape[-1],), weight, eps)
        return y if residual is None else (y, h)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    y = torch.nn.functional.layer_norm(
        h.float(), (h.shape[-1],),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(), eps).to(x.dtype)
    return y if residual is None else (y, h)


def rotary(q, k, cos, sin, positions, *, rotary_dim=None):
    """Rotate-half (GPT-NeoX/Llama) rotary embedding applied in place to the first
    `rotary_dim` features of q [B, Hq, S, D] and k [B, Hk, S, D]. cos/sin are fp32
    tables [max_pos, rotary_dim // 2]; positions [B, S] are per-token position ids."""
    rd = q.shape[-1] if rotary_dim is None else rotary_dim
    half = rd // 2
    c = cos[positions.long()].float()[:, None]  # [B, 1, S, half]
    s = sin[positions.long()].float()[:, None]
    for t in (q, k):
        x1 = t[..., :half].float()
        x2 = t[..., half:rd].float()
        r1 = x1 * c - x2 * s
        r2 = x2 * c + x1 * s
        t[..., :half] = r1.to(t.dtype)
        t[..., half:rd] = r2.to(t.dtype)
    return q, k


MOE_ACTIVATIONS = ("silu",)


def check_fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation) -> None:
    """Clear errors for fused_moe arguments that do not fit together (shapes, dtypes; no sync)."""
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"fused_moe: activation {activation!r} is not supported; supported: {MOE_ACTIVATIONS}")
    if hidden.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"fused_moe: expected hidden [T, H], w_gate_up [E, 2I, H], w_down [E, H, I]; got "
                         f"{tuple(hidden.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    t, h = hidden.shape
    e, two_i, h2 = w_gate_up.shape
    if two_i % 2 or h2 != h or tuple(w_down.shape) != (e, h, two_i // 2):
        raise ValueError(f"fused_moe: w_gate_up {tuple(w_gate_up.shape)} and w_down {tuple(w_down.shape)} do "
                         f"not fit hidden width {h} (expected [E, 2I, {h}] and [E, {h}, I])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={t}, k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32/int64, got {topk_ids.dtype}")
    if w_gate_up.dtype != hidden.dtype or w_down.dtype != hidden.dtype:
        raise ValueError(f"fused_moe: hidden ({hidden.dtype}) and expert weights ({w_gate_up.dtype}, "
                         f"{w_down.dtype}) must share a dtype")


def fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, *, activation="silu"):
    """Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(hidden[t]) with expert_e(x) =
    (act(x·G_eᵀ) ⊙ x·U_eᵀ)·D_eᵀ, G_e/U_e the first/second half of w_gate_up[e] ([E, 2I, H]) and
    D_e = w_down[e] ([E, H, I]). Products in fp32 (fp64 for fp64 inputs); the activation product is
    rounded to the input dtype once (as a kernel stores it between its two matmuls); the output
    once. Differentiable."""
    check_fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    t, k = topk_ids.shape
    half = w_gate_up.shape[1] // 2
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    flat = topk_ids.reshape(-1).long()
    # slots sorted by expert: each expert's rows are one contiguous run (one sort, one scatter-add)
    order = torch.argsort(flat, stable=True)
    token = torch.div(order, k, rounding_mode="floor")
    counts = torch.zeros(w_gate_up.shape[0], dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat)).tolist()
    x = hidden[token].to(acc)
    ys, start = [], 0
    for e, n in enumerate(counts):
        if n:
            gate_up = x[start:start + n] @ w_gate_up[e].to(acc).t()
            act = torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:]
            ys.append(act.to(hidden.dtype).to(acc) @ w_down[e].to(acc).t())
            start += n
    if not ys:  # no tokens
        return hidden.new_zeros(hidden.shape)
    y = torch.cat(ys) * topk_weights.reshape(-1)[order].to(acc)[:, None]
    out = torch.zeros(t, hidden.shape[1], dtype=acc, device=hidden.device).index_add_(0, token, y)
    return out.to(hidden.dtype)
