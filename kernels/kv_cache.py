"""KV-cache append: write new keys/values [B, Hkv, T, D] into the caches at per-sequence
offsets `positions[b]`, in place (one launch for both caches)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Kernel, next_pow2


@triton.jit
def _append_kernel(KC, VC, K, V, Pos, spos, n_kv_heads, seq_new, cache_len,
                   sckb, sckh, scks, sckd, scvb, scvh, scvs, scvd,
                   skb, skh, sks, skd, svb, svh, svs, svd,
                   HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)  # int64: b * batch_stride can pass 2**31
    h = pid_bh % n_kv_heads
    pos0 = tl.load(Pos + b * spos).to(tl.int64)  # positions may be an expanded (stride 0) scalar
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    dst_t = pos0 + offs_t
    # never write outside the cache: an overflowing append is dropped, not a memory corruption
    ok = ((offs_t < seq_new) & (dst_t < cache_len) & (dst_t >= 0))[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * skb + h * skh + offs_t[:, None] * sks + offs_d[None, :] * skd, mask=ok)
    v = tl.load(V + b * svb + h * svh + offs_t[:, None] * svs + offs_d[None, :] * svd, mask=ok)
    tl.store(KC + b * sckb + h * sckh + dst_t[:, None] * scks + offs_d[None, :] * sckd,
             k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + b * scvb + h * scvh + dst_t[:, None] * scvs + offs_d[None, :] * scvd,
             v.to(VC.dtype.element_ty), mask=ok)


_kernel = Kernel(_append_kernel)


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    positions: torch.Tensor):
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must be equal [B, Hkv, Smax, D]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hkv, smax, d = k_cache.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[1] != hkv or k.shape[3] != d:
        raise ValueError(f"k, v must be [B={b}, Hkv={hkv}, T, D={d}]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if positions.shape != (b,) or positions.is_floating_point():
        raise ValueError(f"positions must be an integer tensor of shape [{b}]")
    positions = positions.to(k_cache.device)
    if k_cache.device.type == "cpu":  # cheap here; on GPU it would cost a sync per decode step
        if int(positions.min()) < 0 or int(positions.max()) + k.shape[2] > smax:
            raise IndexError(f"kv_cache_append: positions {positions.tolist()} + {k.shape[2]} new tokens "
                             f"exceed the cache capacity {smax}; allocate a larger cache")
    t = k.shape[2]
    if t == 0 or b == 0:
        return k_cache, v_cache
    block_t = min(64, max(1, next_pow2(t)))
    _kernel.launch(lambda meta: (triton.cdiv(t, block_t), b * hkv), k_cache, v_cache, k, v,
                   positions, positions.stride(0), hkv, t, smax, *k_cache.stride(), *v_cache.stride(),
                   *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_T=block_t,
                   BLOCK_D=next_pow2(d), num_warps=4)
    return k_cache, v_cache
