"""Fused token log-probs: log p(target), the entropy and their gradient, with at most one
[rows, V] chunk of logits alive, in the input dtype.

Per chunk of rows the logits are one cuBLAS GEMM (h_c·Wᵀ). `_stats_kernel` walks each row's
vocabulary in BLOCK_V slices with an online max / sum-of-exponentials (and Σ p·z for the
entropy), all in fp32, and writes log p(target), the entropy and the logsumexp. The backward
recomputes the chunk's logits, `_grad_kernel` overwrites them in place with
dz = (g_logp·(onehot - p) - g_ent·p·(log p + H)) / T, and two GEMMs give dh_c = dz·W and
dW += dzᵀ·h_c (accumulated in fp32 across chunks). Rows with a negative target (HF's -100)
give 0 and no gradient. A chunk has as many rows as fit LOGITS_CHUNK_BYTES of logits (large
GEMMs, few launches), and at least enough that the chunk is about as large as the hidden states
(Liger-Kernel's rule for its fused linear cross-entropy); never [N, V] unless that is small.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Kernel, interpreting, new_empty, next_pow2


@triton.jit
def _stats_kernel(Z, T, LOGP, ENT, LSE, V, stride_z, inv_temp,
                  WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    target = tl.load(T + row).to(tl.int64)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    pz = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    zt = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.load(z_row + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, 0)
        if WANT_ENTROPY:
            pz = pz * alpha + tl.sum(e * tl.where(ok, z, 0.0), 0)
        zt += tl.sum(tl.where(offs == target, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    keep = target >= 0
    tl.store(LSE + row, lse)
    tl.store(LOGP + row, tl.where(keep, zt - lse, 0.0))
    if WANT_ENTROPY:
        tl.store(ENT + row, tl.where(keep, lse - pz / s, 0.0))


@triton.jit
def _grad_kernel(Z, T, LSE, ENT, GLOGP, GENT, V, stride_z, inv_temp,
                 WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    target = tl.load(T + row).to(tl.int64)
    keep = target >= 0
    lse = tl.load(LSE + row)
    g_logp = tl.where(keep, tl.load(GLOGP + row), 0.0)
    if WANT_ENTROPY:
        ent = tl.load(ENT + row)
        g_ent = tl.where(keep, tl.load(GENT + row), 0.0)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.load(z_row + offs, mask=ok, other=0.0).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        dz = tl.where(offs == target, g_logp, 0.0) - g_logp * p
        if WANT_ENTROPY:
            dz -= g_ent * p * (logp + ent)
        tl.store(z_row + offs, (dz * inv_temp).to(Z.dtype.element_ty), mask=ok)


_stats = Kernel(_stats_kernel)
_grad = Kernel(_grad_kernel)


def _block_v(v: int) -> int:
    return min(next_pow2(v), 1024 if interpreting() else 4096)


LOGITS_CHUNK_BYTES = 256 << 20  # one [rows, V] chunk of logits in the input dtype
_fp32_accumulate_ok = True      # torch.addmm(..., out_dtype=float32): CUDA only


def row_chunk(n: int, v: int, h: int, elem_bytes: int) -> int:
    """Rows per chunk: a power of two whose [rows, V] logits fit LOGITS_CHUNK_BYTES, and at least
    enough rows that the chunk is about the size of the hidden states [N, H]."""
    fit = max(1, LOGITS_CHUNK_BYTES // (v * elem_bytes))
    return max(1, min(n, max(next_pow2(triton.cdiv(n, triton.cdiv(v, h))), 1 << (fit.bit_length() - 1))))


def _accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, hc: torch.Tensor) -> None:
    """dw (fp32) += dzᵀ·hc without a [V, H] temporary where the GEMM can write fp32 itself."""
    global _fp32_accumulate_ok
    if dw.dtype == dz.dtype:
        dw.addmm_(dz.t(), hc)
        return
    if _fp32_accumulate_ok and dw.is_cuda:
        try:
            torch.addmm(dw, dz.t(), hc, out_dtype=torch.float32, out=dw)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _fp32_accumulate_ok = False
    dw += (dz.t() @ hc).float()


def _launch_args(v: int):
    bv = _block_v(v)
    return dict(BLOCK_V=bv, num_warps=16 if bv >= 4096 else 8)


def token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           inv_temp: float, want_entropy: bool):
    """(logp [N] fp32, entropy [N] fp32 or [0], lse [N] fp32)."""
    n, h = hidden.shape
    v = weight.shape[0]
    logp = new_empty((n,), torch.float32, hidden.device)
    ent = new_empty((n if want_entropy else 0,), torch.float32, hidden.device)
    lse = new_empty((n,), torch.float32, hidden.device)
    if n == 0:
        return logp, ent, lse
    targets = targets.contiguous()
    rows = row_chunk(n, v, h, hidden.element_size())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = hidden[r0:r1] @ weight.t()
        _stats.launch(lambda meta: (r1 - r0,), z, targets[r0:], logp[r0:], ent[r0:] if want_entropy else ent,
                      lse[r0:], v, z.stride(0), float(inv_temp), WANT_ENTROPY=want_entropy, **_launch_args(v))
    return logp, ent, lse


def token_logprobs_backward(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp: float,
                            need_hidden: bool, need_weight: bool):
    """(d hidden in hidden's dtype or None, d weight in weight's dtype or None)."""
    n, h = hidden.shape
    v = weight.shape[0]
    want_entropy = g_ent is not None and entropy.numel() == n
    dh = new_empty(hidden.shape, hidden.dtype, hidden.device) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    if n == 0:
        return dh, (None if dw is None else dw.to(weight.dtype))
    targets = targets.contiguous()
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous() if want_entropy else g_logp
    ent = entropy if want_entropy else lse
    rows = row_chunk(n, v, h, hidden.element_size())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        hc = hidden[r0:r1]
        z = hc @ weight.t()
        _grad.launch(lambda meta: (r1 - r0,), z, targets[r0:], lse[r0:], ent[r0:], g_logp[r0:], g_ent[r0:],
                     v, z.stride(0), float(inv_temp), WANT_ENTROPY=want_entropy, **_launch_args(v))
        if need_hidden:
            torch.matmul(z, weight, out=dh[r0:r1])
        if need_weight:
            _accumulate_dw(dw, z, hc)
    return dh, (None if dw is None else dw.to(weight.dtype))
