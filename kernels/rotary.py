"""Rotary position embedding (rotate-half, GPT-NeoX/Llama style), in place on q and k.

One program per (token, block of heads): the fp32 cos/sin row of the token's position is
loaded once and applied to every head of the block; only the first `rotary_dim` features
change (partial rotary). Positions are per token, so left padding and per-sequence offsets
are just different position ids.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import Kernel, next_pow2


@triton.jit
def _rotary_kernel(X, Cos, Sin, Pos, n_heads, seq, sxb, sxh, sxs, sxd, spb, sps, sc,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0)
    b = (tok // seq).to(tl.int64)
    s = tok % seq
    pos = tl.load(Pos + b * spb + s * sps).to(tl.int64)
    offs_f = tl.arange(0, BLOCK_HALF)
    f_ok = offs_f < HALF
    c = tl.load(Cos + pos * sc + offs_f, mask=f_ok, other=0.0)[None, :]
    sn = tl.load(Sin + pos * sc + offs_f, mask=f_ok, other=0.0)[None, :]
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (offs_h < n_heads)[:, None] & f_ok[None, :]
    base = X + b * sxb + s * sxs + offs_h[:, None] * sxh + offs_f[None, :] * sxd
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF * sxd, mask=ok, other=0.0).to(tl.float32)
    tl.store(base, (x1 * c - x2 * sn).to(X.dtype.element_ty), mask=ok)
    tl.store(base + HALF * sxd, (x2 * c + x1 * sn).to(X.dtype.element_ty), mask=ok)


_kernel = Kernel(_rotary_kernel)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor, *, rotary_dim: Optional[int] = None):
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"rotary expects q [B, Hq, S, D] and k [B, Hk, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    b, _, s, d = q.shape
    rd = d if rotary_dim is None else int(rotary_dim)
    if rd % 2 or not 0 < rd <= d:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={d}]; got {rd}")
    half = rd // 2
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != half:
        raise ValueError(f"cos/sin must be tables [max_pos, rotary_dim // 2 = {half}]; "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"cos/sin tables must be float32 (got {cos.dtype}); build them in fp32")
    if positions.shape != (b, s) or positions.is_floating_point():
        raise ValueError(f"positions must be integer ids of shape [B, S] = {(b, s)}, got {tuple(positions.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()  # no-ops for the usual tables
    if b * s == 0:
        return q, k
    for t in (q, k):
        heads = t.shape[1]
        block_h = min(16, next_pow2(heads))
        _kernel.launch(lambda meta: (b * s, triton.cdiv(heads, block_h)), t, cos, sin, positions,
                       heads, s, *t.stride(), *positions.stride(), cos.stride(0),
                       HALF=half, BLOCK_H=block_h, BLOCK_HALF=next_pow2(half), num_warps=4)
    return q, k
