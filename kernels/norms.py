"""RMSNorm and LayerNorm over the last dimension, fp32 math, optional fused residual add.

With a residual, h = x + residual is rounded to x's dtype, written out (the next layer's
residual stream) and normalised, exactly as the reference does. One program per row.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import Kernel, new_empty, next_pow2


@triton.jit
def _norm_kernel(X, R, W, Bias, Y, H, n_cols, sx, sr, sy, sh, eps,
                 IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * sr + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * sh + cols, x, mask=ok)
    xf = x.to(tl.float32)
    if IS_RMS:
        y = xf * tl.math.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    else:
        mean = tl.sum(xf, 0) / n_cols
        xc = tl.where(ok, xf - mean, 0.0)
        y = xc * tl.math.rsqrt(tl.sum(xc * xc, 0) / n_cols + eps)
    if HAS_W:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(Bias + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=ok)


_kernel = Kernel(_norm_kernel)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm(x, weight, bias, eps, residual, is_rms: bool):
    name = "rms_norm" if is_rms else "layer_norm"
    n = x.shape[-1]
    for nm, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (n,):
            raise ValueError(f"{name}: {nm} must have shape [{n}] (the last dim of x), got {tuple(p.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{name}: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if n > 65536:
        raise ValueError(f"{name}: last dim {n} > 65536 is not supported by the triton backend; use backend='torch'")
    x2 = _rows(x, n)
    weight = weight.contiguous() if weight is not None else None  # no-ops for parameters
    bias = bias.contiguous() if bias is not None else None
    y = new_empty(x.shape, x.dtype, x.device)
    y2 = y.view(-1, n)
    h = new_empty(x.shape, x.dtype, x.device) if residual is not None else None
    r2 = _rows(residual, n) if residual is not None else x2
    h2 = h.view(-1, n) if h is not None else y2
    rows = x2.shape[0]
    if rows and n:
        block = next_pow2(n)
        warps = min(16, max(1, block // 512))
        _kernel.launch(lambda meta: (rows,), x2, r2, weight if weight is not None else x2,
                       bias if bias is not None else x2, y2, h2, n,
                       x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), float(eps),
                       IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None,
                       HAS_B=bias is not None, BLOCK=block, num_warps=warps)
    return y if residual is None else (y, h)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None):
    return _norm(x, weight, None, eps, residual, True)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, residual: Optional[torch.Tensor] = None):
    return _norm(x, weight, bias, eps, residual, False)
