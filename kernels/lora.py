"""LoRA kernels: the expand-and-accumulate step of an unmerged LoRA linear, and fuse/unfuse.

`lora_linear` computes y = x·Wᵀ + b (cuBLAS) then adds scaling·(x·Aᵀ)·Bᵀ into y in place:
the shrink x·Aᵀ is a tiny [M, r] GEMM, and `lora_expand_` multiplies it by Bᵀ in fp32
and accumulates straight into the base output, so no second full-size [M, out] tensor is
ever materialised (the unfused PyTorch form allocates two). The backward is a plain
composition of GEMMs (see `lora_linear_backward`), which is what a hand-written kernel
would do too: every term is a GEMM whose cost is set by cuBLAS.

`lora_fuse` writes W ± scaling·B·A with the product in fp32 and one rounding to W's dtype;
`out` may be `weight` itself (each tile is read before it is written by the same program).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import Kernel


@triton.jit
def _expand_kernel(Out, XA, Bw, M, N, R, scaling, som, son, sxm, sxr, sbn, sbr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        xa = tl.load(XA + offs_m[:, None] * sxm + offs_r[None, :] * sxr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        bt = tl.load(Bw + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                     mask=n_ok[None, :] & r_ok[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(xa, bt, input_precision="ieee")
    ptrs = Out + offs_m[:, None] * som + offs_n[None, :] * son
    ok = m_ok[:, None] & n_ok[None, :]
    base = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (base + scaling * acc).to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _fuse_kernel(W, A, Bw, Out, N, K, R, scaling, swn, swk, sar, sak, sbn, sbr, son, sok,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        b = tl.load(Bw + offs_n[:, None] * sbn + offs_r[None, :] * sbr,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(A + offs_r[:, None] * sar + offs_k[None, :] * sak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(b, a, input_precision="ieee")
    ok = n_ok[:, None] & k_ok[None, :]
    w = tl.load(W + offs_n[:, None] * swn + offs_k[None, :] * swk, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + offs_n[:, None] * son + offs_k[None, :] * sok,
             (w + acc * scaling).to(Out.dtype.element_ty), mask=ok)


_expand = Kernel(_expand_kernel)
_fuse = Kernel(_fuse_kernel)


def check_lora(weight, lora_a, lora_b, what):
    if weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"{what}: weight [out, in], lora_a [r, in], lora_b [out, r] must be 2-D")
    n, k = weight.shape
    r = lora_a.shape[0]
    if lora_a.shape[1] != k or lora_b.shape != (n, r):
        raise ValueError(f"{what}: shapes do not chain: weight {tuple(weight.shape)}, lora_a "
                         f"{tuple(lora_a.shape)} (want [r, {k}]), lora_b {tuple(lora_b.shape)} (want [{n}, r])")


def lora_expand_(out2d: torch.Tensor, xa2d: torch.Tensor, lora_b: torch.Tensor, scaling: float):
    """out2d[M, N] += scaling · xa2d[M, r] · lora_bᵀ, accumulated in fp32, in place."""
    m, n = out2d.shape
    r = xa2d.shape[1]
    if m == 0 or n == 0 or r == 0:
        return out2d
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 128 if m <= 32 else 64
    block_r = 16 if r <= 16 else 32
    _expand.launch(lambda meta: (triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
                   out2d, xa2d, lora_b, m, n, r, float(scaling), *out2d.stride(), *xa2d.stride(),
                   *lora_b.stride(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    return out2d


def lora_linear_forward(x, weight, bias, lora_a, lora_b, scaling):
    """Returns (y, xa): y = x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ, xa = x·Aᵀ (kept for the backward)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"lora_linear: x's last dim {x.shape[-1]} != weight in_features {weight.shape[1]}")
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_a is None or lora_b is None or scaling == 0:
        return y, x.new_empty(0)
    check_lora(weight, lora_a, lora_b, "lora_linear")
    xa = torch.nn.functional.linear(x, lora_a)
    lora_expand_(y.view(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_b, scaling)
    return y, xa


def lora_linear_backward(grad, x, weight, lora_a, lora_b, scaling, xa, needs):
    """Gradients of lora_linear for the inputs flagged in `needs` (x, weight, bias, a, b).

    With g = dL/dy and u = g·B (an [M, r] GEMM): dx = g·W + scaling·u·A, dW = gᵀ·x,
    db = Σ g, dA = scaling·uᵀ·x, dB = scaling·gᵀ·xa.
    """
    n, k = weight.shape
    g2 = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    has_lora = lora_a is not None and lora_b is not None and scaling != 0 and xa.numel() > 0
    u = g2 @ lora_b if has_lora and (needs[0] or needs[3]) else None
    gx = gw = gb = ga = gbb = None
    if needs[0]:
        gx = g2 @ weight
        if u is not None:
            gx = gx + scaling * (u @ lora_a)
        gx = gx.view(x.shape)
    if needs[1]:
        gw = g2.t() @ x2
    if needs[2]:
        gb = g2.sum(0)
    if needs[3]:
        ga = scaling * (u.t() @ x2) if has_lora else torch.zeros_like(lora_a)
    if needs[4]:
        gbb = scaling * (g2.t() @ xa.reshape(-1, xa.shape[-1])) if has_lora else torch.zeros_like(lora_b)
    return gx, gw, gb, ga, gbb


def lora_fuse(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              out: torch.Tensor) -> torch.Tensor:
    """out = weight + scaling·B·A (lora_unfuse: a negative scaling); `out` may be `weight`."""
    check_lora(weight, lora_a, lora_b, "lora_fuse")
    if out.shape != weight.shape or out.dtype != weight.dtype:
        raise ValueError(f"lora_fuse: out must match weight's shape/dtype {tuple(weight.shape)}/{weight.dtype}; "
                         f"got {tuple(out.shape)}/{out.dtype}")
    n, k = weight.shape
    r = lora_a.shape[0]
    if n == 0 or k == 0:
        return out
    block_r = 16 if r <= 16 else 32
    _fuse.launch(lambda meta: (triton.cdiv(n, 64), triton.cdiv(k, 64)), weight, lora_a, lora_b, out,
                 n, k, r, float(scaling), *weight.stride(), *lora_a.stride(), *lora_b.stride(),
                 *out.stride(), BLOCK_N=64, BLOCK_K=64, BLOCK_R=block_r, num_warps=4)
    return out

