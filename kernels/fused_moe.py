"""Fused mixture-of-experts MLP: every token through its top-k experts in two grouped matmuls.

The (token, slot) pairs of a batch are sorted by expert and laid out in blocks of BLOCK_M rows,
each block holding rows of one expert only (an expert's rows are padded up to a multiple of
BLOCK_M with a sentinel that the kernels skip). Then:

1. `_gate_up_kernel`, one grouped matmul over all experts: a program takes one block of rows and
   BLOCK_N intermediate features, multiplies the rows' hidden states by that expert's gate and
   up rows (two fp32 accumulators over the same loaded activations) and stores
   act(gate) * up, rounded to the input dtype, in an [n_slots, I] buffer;
2. `_down_kernel`, the second grouped matmul: the intermediate rows times the expert's down
   projection, scaled by the slot's routing weight, stored in fp32 [n_slots, H];
3. a fixed-order sum over each token's k slots (deterministic; no atomics).

The sort and block layout (`align_slots`) are a few torch ops on the GPU with sizes that depend
only on (tokens, k, experts), so no host synchronisation happens and the launch grid is static
(CUDA-graph friendly): blocks past the last expert's rows see expert -1 and return at once.
Experts that no token chose cost nothing.

Weights are HF transformers 5's fused layout: w_gate_up [E, 2I, H] ([gate | up] rows),
w_down [E, H, I]. The semantics are `fastrlhf.ops.reference.fused_moe`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._launch import Kernel, interpreting, new_empty

ACTIVATIONS = ("silu",)


@triton.jit
def _block_rows(BlockExpert, Slots, n_slots, BLOCK_M: tl.constexpr):
    """(expert, slots, valid) of this program's block of rows; expert < 0 past the last expert."""
    pid_m = tl.program_id(0)
    slot = tl.load(Slots + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # the buffer spans every block
    return tl.load(BlockExpert + pid_m), slot, slot < n_slots


@triton.jit
def _gate_up_kernel(X, W, Inter, Slots, BlockExpert, n_slots, top_k, H, I,
                    sxt, sxh, swe, swn, swh, sis, sii,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr):
    expert, slot, row_ok = _block_rows(BlockExpert, Slots, n_slots, BLOCK_M)
    if expert < 0:  # past the last expert's rows
        return
    tok = (slot // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    w_base = W + expert.to(tl.int64) * swe
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x = tl.load(X + tok[:, None] * sxt + offs_k[None, :] * sxh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = n_ok[None, :] & k_ok[:, None]
        wg = tl.load(w_base + offs_n[None, :] * swn + offs_k[:, None] * swh, mask=w_ok, other=0.0)
        wu = tl.load(w_base + (offs_n[None, :] + I) * swn + offs_k[:, None] * swh, mask=w_ok, other=0.0)
        if IEEE:
            acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
            acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, wg, acc_g)
            acc_u = tl.dot(x, wu, acc_u)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, in fp32
    tl.store(Inter + slot[:, None].to(tl.int64) * sis + offs_n[None, :] * sii,
             act.to(Inter.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(Inter, W, Out, Slots, BlockExpert, RouteW, n_slots, H, I,
                 sis, sii, swe, swh, swi, sos, soh,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
    expert, slot, row_ok = _block_rows(BlockExpert, Slots, n_slots, BLOCK_M)
    if expert < 0:
        return
    slot64 = slot.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    w_base = W + expert.to(tl.int64) * swe
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(Inter + slot64[:, None] * sis + offs_k[None, :] * sii,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * swh + offs_k[:, None] * swi,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    rw = tl.load(RouteW + slot64, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Out + slot64[:, None] * sos + offs_n[None, :] * soh, acc * rw[:, None],
             mask=row_ok[:, None] & n_ok[None, :])


def _configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn in (64, 128) for bk in (64, 128) for w in (4, 8) for s in (3, 4)]


_INTERPRET = {"BLOCK_N": 32, "BLOCK_K": 32}
_gate_up = Kernel(_gate_up_kernel, configs=_configs(), key=["H", "I", "BLOCK_M"], interpret_meta=_INTERPRET)
_down = Kernel(_down_kernel, configs=_configs(), key=["H", "I", "BLOCK_M"], interpret_meta=_INTERPRET)


def block_m_for(n_slots: int, n_experts: int) -> int:
    """Rows per block: small when experts see few rows each (decode), larger for prefill."""
    if interpreting():
        return 16
    per_expert = n_slots / max(n_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def align_slots(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(slots, block_expert): the flat slot indices t * k + j sorted by expert, each expert's run
    padded to a multiple of block_m with the sentinel n_slots, in a buffer of a size that depends
    only on the shapes; block_expert[b] is the expert of block b, or -1 past the last one."""
    flat = topk_ids.reshape(-1).long()
    n_slots = flat.numel()
    dev = flat.device
    order = torch.argsort(flat, stable=True)
    # not bincount: on CUDA it reads the maximum back to the host, which CUDA graphs forbid
    counts = torch.zeros(n_experts, dtype=torch.long, device=dev).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    expert_sorted = flat[order]
    position = padded_start[expert_sorted] + torch.arange(n_slots, device=dev) - start[expert_sorted]
    # sum over experts of ceil(count / block_m) <= ceil(n_slots / block_m) + (experts used)
    n_blocks = triton.cdiv(n_slots, block_m) + min(n_experts, n_slots)
    slots = torch.full((n_blocks * block_m,), n_slots, dtype=torch.int32, device=dev)
    slots[position] = order.to(torch.int32)
    block_start = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return slots, block_expert


def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_moe: activation {activation!r} has no kernel; supported: {ACTIVATIONS}")
    t, h = hidden.shape
    k = topk_ids.shape[1]
    e, two_i, _ = w_gate_up.shape
    inter_dim = two_i // 2
    n_slots = t * k
    out = new_empty((t, h), hidden.dtype, hidden.device)
    if n_slots == 0:
        return out
    block_m = block_m_for(n_slots, e)
    slots, block_expert = align_slots(topk_ids, e, block_m)
    n_blocks = block_expert.numel()
    inter = new_empty((n_slots, inter_dim), hidden.dtype, hidden.device)  # poisoned in tests
    ieee = hidden.dtype == torch.float32
    _gate_up.launch(lambda meta: (n_blocks, triton.cdiv(inter_dim, meta["BLOCK_N"])),
                    hidden, w_gate_up, inter, slots, block_expert, n_slots, k, h, inter_dim,
                    hidden.stride(0), hidden.stride(1), w_gate_up.stride(0), w_gate_up.stride(1),
                    w_gate_up.stride(2), inter.stride(0), inter.stride(1), BLOCK_M=block_m, IEEE=ieee)
    partial = new_empty((n_slots, h), torch.float32, hidden.device)
    route_w = topk_weights.reshape(-1).float().contiguous()
    _down.launch(lambda meta: (n_blocks, triton.cdiv(h, meta["BLOCK_N"])),
                 inter, w_down, partial, slots, block_expert, route_w, n_slots, h, inter_dim,
                 inter.stride(0), inter.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2),
                 partial.stride(0), partial.stride(1), BLOCK_M=block_m, IEEE=ieee)
    return out.copy_(partial.view(t, k, h).sum(dim=1))
