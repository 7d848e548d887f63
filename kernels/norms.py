"""RMSNorm and LayerNorm over the last dimension, fp32 math, optional fused residual add,
and their backward.

With a residual, h = x + residual is rounded to x's dtype, written out (the next layer's
residual stream) and normalised, exactly as the reference does. One program per row.

Backward (`norm_backward`): each program takes a fixed block of rows, recomputes the row
statistics from h (cheaper than storing them: the row is loaded anyway), writes
dh = d(norm)/dh + the gradient arriving at the h output (the residual form), and keeps its
rows' contributions to dweight/dbias in fp32 registers; the per-program partials are then
summed in a fixed order (`_partials_kernel`), so weight gradients are bit-reproducible. With
x̂ the normalised row, g = dy·w and rstd = 1/sqrt(var + eps):
  RMSNorm:   dh = rstd·(g − x̂·mean(g·x̂))
  LayerNorm: dh = rstd·(g − mean(g) − x̂·mean(g·x̂));   dw = Σ dy·x̂, db = Σ dy.
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


@triton.jit
def _norm_bwd_kernel(H, DY, DHO, W, DH, DR, DWP, DBP, n_rows, n_cols, rows_per_prog,
                     sh, sdy, sdho, sdh, sdr, eps,
                     IS_RMS: tl.constexpr, HAS_DHO: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_DR: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    first = pid.to(tl.int64) * rows_per_prog
    last = tl.minimum(first + rows_per_prog, n_rows)
    for row in range(first, last):
        h = tl.load(H + row * sh + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sdy + cols, mask=ok, other=0.0).to(tl.float32)
        if IS_RMS:
            rstd = tl.math.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
            xhat = h * rstd
        else:
            mean = tl.sum(h, 0) / n_cols
            hc = tl.where(ok, h - mean, 0.0)
            rstd = tl.math.rsqrt(tl.sum(hc * hc, 0) / n_cols + eps)
            xhat = hc * rstd
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if NEED_DW:
            dw += dy * xhat
        if NEED_DB:
            db += dy
        c1 = tl.sum(g * xhat, 0) / n_cols
        if IS_RMS:
            dh = (g - xhat * c1) * rstd
        else:
            dh = (g - tl.sum(g, 0) / n_cols - xhat * c1) * rstd
        if HAS_DHO:
            dh += tl.load(DHO + row * sdho + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DH + row * sdh + cols, dh.to(DH.dtype.element_ty), mask=ok)
        if HAS_DR:
            tl.store(DR + row * sdr + cols, dh.to(DR.dtype.element_ty), mask=ok)
    if NEED_DW:
        tl.store(DWP + pid * n_cols + cols, dw, mask=ok)
    if NEED_DB:
        tl.store(DBP + pid * n_cols + cols, db, mask=ok)


@triton.jit
def _partials_kernel(P, Out, n_parts, n_cols, BLOCK: tl.constexpr):
    """Out[c] = Σ_p P[p, c], summed in the order p = 0, 1, ... (fp32), cast to Out's dtype."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    acc = tl.zeros([BLOCK], tl.float32)
    for p in range(0, n_parts):
        acc += tl.load(P + p * n_cols + cols, mask=ok, other=0.0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=ok)


_bwd_kernel = Kernel(_norm_bwd_kernel)
_partials = Kernel(_partials_kernel)
# Programs of the backward: a fixed number (not the GPU's SM count), so the partial sums, and
# hence the bits of dweight, are the same on every device for the same shapes.
BWD_PROGRAMS = 512


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


def _sum_partials(parts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n_parts, n = parts.shape
    out = new_empty(like.shape, like.dtype, like.device)
    _partials.launch(lambda meta: (triton.cdiv(n, 256),), parts, out, n_parts, n, BLOCK=256, num_warps=4)
    return out


def norm_backward(grad_y: torch.Tensor, h: torch.Tensor, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float, is_rms: bool, *,
                  grad_h: Optional[torch.Tensor] = None, residual_dtype: Optional[torch.dtype] = None,
                  needs=(True, True, True, True)):
    """Gradients of y = norm(h) (plus `grad_h`, the gradient arriving at the h output of the
    residual form) for (h's input x, residual, weight, bias), each None unless flagged in
    `needs` (and, for residual, unless `residual_dtype` is given: the residual form).
    dx is in h's dtype, dresidual in `residual_dtype`, dweight/dbias in the parameters' dtypes."""
    n = h.shape[-1]
    h2 = _rows(h, n)
    rows = h2.shape[0]
    dy2 = _rows(grad_y, n)
    dho2 = _rows(grad_h, n) if grad_h is not None else None
    need_dx = needs[0]
    need_dr = residual_dtype is not None and needs[1]
    need_dw = weight is not None and needs[2]
    need_db = bias is not None and needs[3]
    dx = new_empty(h.shape, h.dtype, h.device) if need_dx or need_dr else None
    dr = new_empty(h.shape, residual_dtype, h.device) if need_dr else None
    if dx is None and not (need_dw or need_db):
        return None, None, None, None
    if dx is None:  # only parameter gradients asked for: dx is still written (scratch)
        dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    programs = max(1, min(rows, BWD_PROGRAMS))
    per_prog = triton.cdiv(rows, programs) if rows else 1
    programs = triton.cdiv(rows, per_prog) if rows else 0
    dwp = new_empty((programs, n), torch.float32, h.device) if need_dw else None
    dbp = new_empty((programs, n), torch.float32, h.device) if need_db else None
    dx2 = dx.view(-1, n)
    dr2 = dr.view(-1, n) if dr is not None else dx2
    if rows and n:
        block = next_pow2(n)
        warps = min(16, max(1, block // 512))
        _bwd_kernel.launch(lambda meta: (programs,), h2, dy2, dho2 if dho2 is not None else dy2,
                           weight.contiguous() if weight is not None else h2, dx2, dr2,
                           dwp if dwp is not None else h2, dbp if dbp is not None else h2,
                           rows, n, per_prog, h2.stride(0), dy2.stride(0),
                           dho2.stride(0) if dho2 is not None else 0, dx2.stride(0), dr2.stride(0), float(eps),
                           IS_RMS=is_rms, HAS_DHO=dho2 is not None, HAS_W=weight is not None,
                           HAS_DR=dr is not None, NEED_DW=need_dw, NEED_DB=need_db,
                           BLOCK=block, num_warps=warps)
    dw = db = None
    if need_dw:
        dw = _sum_partials(dwp, weight) if programs else torch.zeros_like(weight)
    if need_db:
        db = _sum_partials(dbp, bias) if programs else torch.zeros_like(bias)
    return (dx if need_dx else None), dr, dw, db


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None):
    return _norm(x, weight, None, eps, residual, True)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, residual: Optional[torch.Tensor] = None):
    return _norm(x, weight, bias, eps, residual, False)
