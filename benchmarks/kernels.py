"""Kernel benchmark: every op, every available backend, against PyTorch baselines.

    python benchmarks/kernels.py            # full run on the GPU (bf16, production shapes)
    python benchmarks/kernels.py --quick    # smoke run; works on the CPU (fp32, tiny shapes;
                                            # triton only with TRITON_INTERPRET=1)

Measured in one run, on one device:
- prefill attention: TFLOP/s (causal FLOPs, 4·B·H·Sq·Sk·D halved) per backend, vs
  torch SDPA and flash-attn (when installed);
- decode attention: GB/s of KV bytes read (cold L2) and % of the device-to-device copy
  bandwidth measured in the same run, vs SDPA;
- LoRA: time of the unmerged fused LoRA linear over the base GEMM alone (overhead %), at
  decode and prefill shapes; lora_fuse time;
- norms, rotary, KV append: GB/s of bytes moved, % of copy.
- paged decode (`--only paged_decode`): GB/s of KV bytes read through block tables (shuffled pool
  blocks, cold L2), % of the copy bandwidth of a buffer of the same bytes measured in the same
  run (target >= 80%), and the time of the dense attention_decode on the same keys (`vs_dense`);
  paged_kv_append of one token per sequence;
- paged extend (`--only paged_extend`): new tokens appended to long paged sequences (and a full
  prefill), TFLOP/s of the causal part, vs the dense attention_prefill on the same keys;
- backward (`--only prefill_bwd,norms_bwd`; in the default set): attention_prefill's backward
  (dq, dk, dv from a saved forward) in TFLOP/s (2.5× the forward's FLOPs, FlashAttention's
  convention) against PyTorch SDPA's flash backend, with `vs_sdpa_flash` (its time over ours) on
  the triton rows; rms_norm/layer_norm backward (plain and residual form) in GB/s of bytes moved.
  Only the torch reference and the triton kernels have backwards (the cuda backend hands
  gradient calls to triton), so those are the rows.
- sliding window (`--only window`): windowed prefill and decode against the same kernel without
  a window, interleaved (`vs_full`, and `ideal_vs_full`, the ratio of the work), and the ALiBi
  bias's overhead;
- packed sequences (`--only packed`): packed prefill forward and backward (cu_seqlens, one row)
  against the same sequences right-padded to the longest, interleaved (`vs_padded`).
Rows are appended to benchmarks/results/kernels.jsonl (with device, date, commit), a
markdown table is printed, and on CUDA the backend preference table
<device slug>.json (fastest first, per op) that `auto` dispatch loads is written into the
installed package's fastrlhf/ops/tables/ (commit it there to ship it as package data).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from typing import Callable, Dict, List

import torch

from common import append_jsonl, bench, bench_interleaved, copy_bandwidth, device_info, markdown_table
from fastrlhf import ops
from fastrlhf.ops import dispatch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.jsonl")
TABLES = os.path.join(os.path.dirname(ops.__file__), "tables")  # where dispatch looks for them
GB = 1e9


def backends_for(op: str, device: torch.device) -> List[str]:
    """Backends that really run `op` on `device` (no silent fallback)."""
    names = []
    for name in ("torch", "triton", "cuda"):
        ok, _ = dispatch.backend_status(name, device)
        if not ok:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, _ = dispatch.resolve(op, device, name)
        if got == name:
            names.append(name)
    return names


class Runner:
    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.rows: List[dict] = []
        self.info = device_info(device)
        self.reps = 5 if quick else 30
        self.per_round = 1 if quick else 3  # repetitions per function per round of interleaved timing
        self.copy_gbps = copy_bandwidth(device, nbytes=(16 << 20) if quick else None)
        print(f"# {self.info['device']}  {self.info['date']}  copy bandwidth {self.copy_gbps:.1f} GB/s",
              flush=True)

    def time(self, fn: Callable, cold_l2: bool = False) -> float:
        return bench(fn, self.device, reps=self.reps, warmup=1 if self.quick else 5, cold_l2=cold_l2,
                     max_seconds=2.0)["median_ms"]

    def record(self, op: str, shape: str, impl: str, ms: float, *, flops: float = 0.0,
               nbytes: float = 0.0, **extra) -> None:
        row = {**self.info, "op": op, "shape": shape, "impl": impl, "median_ms": ms, "quick": self.quick}
        if flops:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
        if nbytes:
            row["gbps"] = nbytes / (ms * 1e-3) / GB
            row["pct_of_copy"] = 100.0 * row["gbps"] / self.copy_gbps
        row.update(extra)
        self.rows.append(row)
        print(f"{op:18s} {shape:34s} {impl:14s} {ms:9.3f} ms"
              + (f"  {row['tflops']:7.2f} TFLOP/s" if "tflops" in row else "")
              + (f"  {row['gbps']:8.1f} GB/s ({row['pct_of_copy']:.0f}% of copy)" if "gbps" in row else "")
              + (f"  overhead {extra['overhead_pct']:+.1f}%" if "overhead_pct" in extra else ""), flush=True)


def _rand(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device)


def bench_prefill(r: Runner, dtype):
    shapes = [(2, 4, 2, 64, 64)] if r.quick else [(4, 32, 8, 2048, 128), (2, 32, 8, 4096, 128),
                                                   (1, 32, 8, 8192, 128), (8, 32, 32, 1024, 64)]
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    for b, hq, hkv, s, d in shapes:
        q, k, v = (_rand(b, h, s, d, dtype=dtype, device=r.device) for h in (hq, hkv, hkv))
        shape = f"B{b} H{hq}/{hkv} S{s} D{d} causal"
        flops = 4 * b * hq * s * s * d / 2
        for be in backends_for("attention_prefill", r.device):
            if be == "torch" and s > 4096:
                continue  # the fp32 reference materialises B·H·S² scores; not a contender
            fn = ops.resolve("attention_prefill", r.device, be)[1]
            r.record("attention_prefill", shape, be, r.time(lambda: fn(q, k, v, causal=True)), flops=flops)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                                         enable_gqa=hq != hkv)
        r.record("attention_prefill", shape, "sdpa", r.time(sdpa), flops=flops)
        if flash_attn_func is not None and r.device.type == "cuda":
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            r.record("attention_prefill", shape, "flash_attn", r.time(lambda: flash_attn_func(qt, kt, vt, causal=True)),
                     flops=flops)


def bench_decode(r: Runner, dtype):
    shapes = [(2, 4, 2, 300, 64)] if r.quick else [(16, 32, 8, 4096, 128), (64, 32, 8, 4096, 128),
                                                    (16, 32, 8, 16384, 128), (32, 32, 32, 2048, 128)]
    for b, hq, hkv, ctx, d in shapes:
        q = _rand(b, hq, d, dtype=dtype, device=r.device)
        kc, vc = (_rand(b, hkv, ctx, d, dtype=dtype, device=r.device) for _ in range(2))
        lens = torch.full((b,), ctx, dtype=torch.int32, device=r.device)
        shape = f"B{b} H{hq}/{hkv} ctx{ctx} D{d}"
        kv_bytes = 2 * b * hkv * ctx * d * kc.element_size() + 2 * q.numel() * q.element_size()
        for be in backends_for("attention_decode", r.device):
            fn = ops.resolve("attention_decode", r.device, be)[1]
            r.record("attention_decode", shape, be, r.time(lambda: fn(q, kc, vc, lens), cold_l2=True),
                     nbytes=kv_bytes)
        q4 = q[:, :, None]
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, enable_gqa=hq != hkv)  # noqa: E731
        r.record("attention_decode", shape, "sdpa", r.time(sdpa, cold_l2=True), nbytes=kv_bytes)


def bench_lora(r: Runner, dtype):
    shapes = [(4, 64, 48, 8), (64, 64, 48, 8)] if r.quick else [
        (16, 4096, 4096, 16), (16, 4096, 4096, 64), (64, 4096, 11008, 16),
        (4096, 4096, 4096, 16), (4096, 4096, 4096, 64)]
    for m, fin, fout, rank in shapes:
        x = _rand(m, fin, dtype=dtype, device=r.device)
        w = _rand(fout, fin, dtype=dtype, device=r.device) / math.sqrt(fin)
        a = _rand(rank, fin, dtype=dtype, device=r.device) / math.sqrt(fin)
        bm = _rand(fout, rank, dtype=dtype, device=r.device)
        shape = f"M{m} {fin}->{fout} r{rank}"
        base_ms = r.time(lambda: torch.nn.functional.linear(x, w), cold_l2=True)
        w_bytes = w.numel() * w.element_size()
        r.record("lora_linear", shape, "base_gemm", base_ms, nbytes=w_bytes, flops=2 * m * fin * fout)
        with torch.no_grad():
            for be in backends_for("lora_linear", r.device):
                fn = ops.resolve("lora_linear", r.device, be)[1]
                ms = r.time(lambda: fn(x, w, None, a, bm, 2.0), cold_l2=True)
                r.record("lora_linear", shape, be, ms, nbytes=w_bytes, flops=2 * m * fin * fout,
                         overhead_pct=100.0 * (ms / base_ms - 1))
        if m == shapes[0][0]:
            for be in backends_for("lora_fuse", r.device):
                fn = ops.resolve("lora_fuse", r.device, be)[1]
                out = torch.empty_like(w)
                r.record("lora_fuse", shape, be, r.time(lambda: fn(w, a, bm, 2.0, out=out)), nbytes=2 * w_bytes)


def bench_norms_rotary_append(r: Runner, dtype):
    rows, hidden = (64, 512) if r.quick else (16384, 4096)
    x = _rand(rows, hidden, dtype=dtype, device=r.device)
    res = torch.randn_like(x)
    w = _rand(hidden, dtype=dtype, device=r.device)
    el = x.element_size()
    shape = f"{rows}x{hidden}"
    for be in backends_for("rms_norm", r.device):
        fn = ops.resolve("rms_norm", r.device, be)[1]
        r.record("rms_norm", shape, be, r.time(lambda: fn(x, w, 1e-6), cold_l2=True), nbytes=2 * x.numel() * el)
        r.record("rms_norm+residual", shape, be, r.time(lambda: fn(x, w, 1e-6, res), cold_l2=True),
                 nbytes=4 * x.numel() * el)
    for be in backends_for("layer_norm", r.device):
        fn = ops.resolve("layer_norm", r.device, be)[1]
        r.record("layer_norm", shape, be, r.time(lambda: fn(x, w, w, 1e-5), cold_l2=True), nbytes=2 * x.numel() * el)

    b, hq, hkv, s, d = (2, 4, 2, 33, 64) if r.quick else (16, 32, 8, 2048, 128)
    q = _rand(b, hq, s, d, dtype=dtype, device=r.device)
    k = _rand(b, hkv, s, d, dtype=dtype, device=r.device)
    ang = torch.arange(s + 16, device=r.device).float()[:, None] * torch.rand(d // 2, device=r.device)
    cos, sin = ang.cos(), ang.sin()
    pos = torch.arange(s, device=r.device)[None].repeat(b, 1)
    shape = f"B{b} H{hq}/{hkv} S{s} D{d}"
    rot_bytes = 2 * (q.numel() + k.numel()) * el + 2 * b * s * (d // 2) * 4  # q,k r+w; cos/sin rows
    for be in backends_for("rotary", r.device):
        fn = ops.resolve("rotary", r.device, be)[1]
        r.record("rotary", shape, be, r.time(lambda: fn(q, k, cos, sin, pos), cold_l2=True), nbytes=rot_bytes)

    b, hkv, smax, t, d = (2, 2, 64, 8, 64) if r.quick else (64, 8, 4096, 1, 128)
    kc = torch.zeros(b, hkv, smax, d, dtype=dtype, device=r.device)
    vc = torch.zeros_like(kc)
    kn = _rand(b, hkv, t, d, dtype=dtype, device=r.device)
    vn = torch.randn_like(kn)
    p = torch.zeros(b, dtype=torch.long, device=r.device)
    shape = f"B{b} Hkv{hkv} T{t} D{d}"
    for be in backends_for("kv_cache_append", r.device):
        fn = ops.resolve("kv_cache_append", r.device, be)[1]
        r.record("kv_cache_append", shape, be, r.time(lambda: fn(kc, vc, kn, vn, p)),
                 nbytes=4 * kn.numel() * el)


def _paged_pools(b: int, hkv: int, ctx: int, d: int, block_size: int, dtype, device):
    """Pools holding b sequences of ctx tokens in shuffled blocks, and their block tables."""
    per_seq = -(-ctx // block_size)
    blocks = torch.randperm(b * per_seq, device=device).to(torch.int32).view(b, per_seq)
    k_pool, v_pool = (_rand(b * per_seq, hkv, block_size, d, dtype=dtype, device=device) for _ in range(2))
    return k_pool, v_pool, blocks


def _dense_cache(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The same keys as a dense [B, Hkv, S, D] cache (the baseline layout)."""
    g = pool[tables.long()]  # [B, nb, Hkv, bs, D]
    return g.transpose(1, 2).reshape(g.shape[0], g.shape[2], -1, g.shape[-1]).contiguous()


def bench_paged_decode(r: Runner, dtype):
    block_size = 16
    shapes = [(2, 4, 2, 300, 64)] if r.quick else [(32, 32, 8, 1024, 128), (32, 32, 8, 8192, 128),
                                                    (64, 32, 8, 4096, 128), (128, 32, 8, 2048, 128),
                                                    (128, 32, 8, 1024, 128)]
    for b, hq, hkv, ctx, d in shapes:
        k_pool, v_pool, tables = _paged_pools(b, hkv, ctx, d, block_size, dtype, r.device)
        q = _rand(b, hq, d, dtype=dtype, device=r.device)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=r.device)
        el = q.element_size()
        kv_bytes = 2 * b * hkv * ctx * d * el + 2 * q.numel() * el
        same_copy = copy_bandwidth(r.device, nbytes=kv_bytes // 2)  # a copy moving the same bytes
        shape = f"B{b} H{hq}/{hkv} ctx{ctx} D{d} bs{block_size}"
        kc, vc = _dense_cache(k_pool, tables), _dense_cache(v_pool, tables)
        dense = ops.resolve("attention_decode", r.device)
        dense_ms = r.time(lambda: dense[1](q, kc, vc, lens), cold_l2=True)
        r.record("attention_decode(dense)", shape, dense[0], dense_ms, nbytes=kv_bytes)
        del kc, vc
        for be in backends_for("paged_attention_decode", r.device):
            fn = ops.resolve("paged_attention_decode", r.device, be)[1]
            ms = r.time(lambda: fn(q, k_pool, v_pool, tables, lens), cold_l2=True)
            r.record("paged_attention_decode", shape, be, ms, nbytes=kv_bytes, vs_dense=dense_ms / ms,
                     pct_of_same_copy=100.0 * kv_bytes / (ms * 1e-3) / GB / same_copy)
        new_k = _rand(b, hkv, d, dtype=dtype, device=r.device)
        slots = (tables[:, 0].long() * block_size).to(torch.int32)
        for be in backends_for("paged_kv_append", r.device):
            fn = ops.resolve("paged_kv_append", r.device, be)[1]
            r.record("paged_kv_append", f"T{b} Hkv{hkv} D{d}", be,
                     r.time(lambda: fn(k_pool, v_pool, new_k, new_k, slots)), nbytes=4 * new_k.numel() * el)


def bench_paged_extend(r: Runner, dtype):
    block_size = 16
    # (B, Hq, Hkv, context before, new tokens, D); new == context: a plain prefill
    shapes = [(2, 4, 2, 40, 9, 64)] if r.quick else [(32, 32, 8, 2048, 64, 128), (8, 32, 8, 4096, 512, 128),
                                                      (4, 32, 8, 0, 2048, 128)]
    for b, hq, hkv, before, new, d in shapes:
        ctx = before + new
        k_pool, v_pool, tables = _paged_pools(b, hkv, ctx, d, block_size, dtype, r.device)
        q = _rand(b * new, hq, d, dtype=dtype, device=r.device)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=r.device)
        cu = torch.arange(b + 1, dtype=torch.int32, device=r.device) * new
        flops = 4 * b * hq * new * d * (before + (new + 1) / 2)  # each new query sees before + its causal part
        shape = f"B{b} H{hq}/{hkv} ctx{before}+{new} D{d} bs{block_size}"
        kc, vc = _dense_cache(k_pool, tables), _dense_cache(v_pool, tables)
        qd = q.view(b, new, hq, d).transpose(1, 2)
        dense = ops.resolve("attention_prefill", r.device)
        dense_ms = r.time(lambda: dense[1](qd, kc, vc, causal=True))
        r.record("attention_prefill(dense)", shape, dense[0], dense_ms, flops=flops)
        del kc, vc
        for be in backends_for("paged_attention_prefill", r.device):
            fn = ops.resolve("paged_attention_prefill", r.device, be)[1]
            ms = r.time(lambda: fn(q, k_pool, v_pool, tables, cu, lens, max_q_len=new))
            r.record("paged_attention_prefill", shape, be, ms, flops=flops, vs_dense=dense_ms / ms)


def _visible_pairs(sq: int, sk: int, window=None) -> int:
    """(query, key) pairs a causal (bottom-right) attention computes, with an optional window."""
    cols = torch.arange(sq) + (sk - sq)
    seen = cols + 1 if window is None else torch.clamp(cols + 1, max=window)
    return int(seen.sum())


def bench_window(r: Runner, dtype):
    """Sliding-window prefill and decode against the same kernel without a window (interleaved,
    same inputs): `vs_full` is the full call's time over the windowed one, `ideal_vs_full` the
    ratio of the work (key tiles outside the window are skipped); and ALiBi's overhead."""
    pre = [(1, 4, 2, 100, 64, 40)] if r.quick else [(2, 32, 8, 8192, 128, 4096), (2, 32, 8, 8192, 128, 1024)]
    for be in [b for b in ("torch", "triton") if b in backends_for("attention_prefill", r.device)]:
        fn = ops.resolve("attention_prefill", r.device, be)[1]
        for b, hq, hkv, s, d, w in pre:
            if be == "torch" and not r.quick:
                continue  # the reference materialises B·H·S² scores
            q, k, v = (_rand(b, h, s, d, dtype=dtype, device=r.device) for h in (hq, hkv, hkv))
            slopes = torch.rand(hq, device=r.device)
            ms = bench_interleaved({"full": lambda: fn(q, k, v), "window": lambda: fn(q, k, v, window=w),
                                    "alibi": lambda: fn(q, k, v, alibi_slopes=slopes)}, r.device, rounds=r.reps // 3,
                                   reps=r.per_round)
            shape = f"B{b} H{hq}/{hkv} S{s} D{d} W{w}"
            full, win = _visible_pairs(s, s), _visible_pairs(s, s, w)
            r.record("attention_prefill(window)", shape, be, ms["window"], flops=4 * b * hq * d * win,
                     vs_full=ms["full"] / ms["window"], ideal_vs_full=full / win)
            r.record("attention_prefill(alibi)", shape, be, ms["alibi"], flops=4 * b * hq * d * full,
                     overhead_pct=100.0 * (ms["alibi"] / ms["full"] - 1))
    dec = [(2, 4, 2, 100, 64, 30)] if r.quick else [(32, 32, 8, 16384, 128, 4096), (64, 32, 8, 8192, 128, 1024)]
    for b, hq, hkv, ctx, d, w in dec:
        q = _rand(b, hq, d, dtype=dtype, device=r.device)
        kc, vc = (_rand(b, hkv, ctx, d, dtype=dtype, device=r.device) for _ in range(2))
        lens = torch.full((b,), ctx, dtype=torch.int32, device=r.device)
        slopes = torch.rand(hq, device=r.device)
        win_bytes = 2 * b * hkv * w * d * kc.element_size()
        for be in backends_for("attention_decode", r.device):
            fn = ops.resolve("attention_decode", r.device, be)[1]
            ms = bench_interleaved({"full": lambda: fn(q, kc, vc, lens), "window": lambda: fn(q, kc, vc, lens, window=w),
                                    "alibi": lambda: fn(q, kc, vc, lens, window=w, alibi_slopes=slopes)},
                                   r.device, rounds=r.reps // 3, reps=r.per_round, cold_l2=True)
            shape = f"B{b} H{hq}/{hkv} ctx{ctx} D{d} W{w}"
            r.record("attention_decode(window)", shape, be, ms["window"], nbytes=win_bytes,
                     vs_full=ms["full"] / ms["window"], ideal_vs_full=ctx / w)
            # the cuda backend has no alibi kernel: its alibi calls run on triton (the row says so)
            impl = be if be != "cuda" else "cuda->triton"
            r.record("attention_decode(window+alibi)", shape, impl, ms["alibi"], nbytes=win_bytes,
                     overhead_pct=100.0 * (ms["alibi"] / ms["window"] - 1))


def _packed_batch(lengths, hq, hkv, d, dtype, device):
    """The same sequences packed into one row (cu_seqlens) and right-padded into a batch (mask)."""
    total, longest = sum(lengths), max(lengths)
    packed = [_rand(1, h, total, d, dtype=dtype, device=device) for h in (hq, hkv, hkv)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    padded = [torch.zeros(len(lengths), t.shape[1], longest, d, dtype=dtype, device=device) for t in packed]
    mask = torch.zeros(len(lengths), longest, dtype=torch.long, device=device)
    for i, (lo, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        for dst, src in zip(padded, packed):
            dst[i, :, :n] = src[0, :, lo:lo + n]
        mask[i, :n] = 1
    return packed, cu, padded, mask


def bench_packed(r: Runner, dtype):
    """Packed prefill (cu_seqlens, one row) against the same sequences right-padded to the longest,
    forward and backward, interleaved: `vs_padded` is the padded call's time over the packed one.
    FLOPs are the useful ones (each sequence's causal pairs)."""
    gen = torch.Generator().manual_seed(0)
    cases = [([5, 37, 1, 20], 4, 2, 64)] if r.quick else [
        (torch.randint(64, 2049, (16,), generator=gen).tolist(), 32, 8, 128),
        (torch.randint(16, 513, (64,), generator=gen).tolist(), 32, 8, 128)]
    for lengths, hq, hkv, d in cases:
        (q, k, v), cu, (qp, kp, vp), mask = _packed_batch(lengths, hq, hkv, d, dtype, r.device)
        flops = 4 * hq * d * sum(n * (n + 1) // 2 for n in lengths)
        shape = f"N{len(lengths)} T{sum(lengths)} max{max(lengths)} H{hq}/{hkv} D{d}"
        for be in ("torch", "triton"):
            ok, _ = dispatch.backend_status(be, r.device)
            if not ok or (be == "torch" and not r.quick):
                continue
            fn = ops.resolve("attention_prefill", r.device, be)[1]
            ms = bench_interleaved({"packed": lambda: fn(q, k, v, cu_seqlens=cu),
                                    "padded": lambda: fn(qp, kp, vp, attention_mask=mask)}, r.device,
                                   rounds=r.reps // 3, reps=r.per_round)
            r.record("attention_prefill(packed)", shape, be, ms["packed"], flops=flops,
                     vs_padded=ms["padded"] / ms["packed"])
            r.record("attention_prefill(padded)", shape, be, ms["padded"], flops=flops)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            leaves_p = [t.clone().requires_grad_() for t in (qp, kp, vp)]
            out, out_p = fn(*leaves, cu_seqlens=cu), fn(*leaves_p, attention_mask=mask)
            g, g_p = torch.randn_like(out), torch.randn_like(out_p)
            ms = bench_interleaved({
                "packed": lambda: torch.autograd.grad(out, leaves, g, retain_graph=True),
                "padded": lambda: torch.autograd.grad(out_p, leaves_p, g_p, retain_graph=True)},
                r.device, rounds=r.reps // 3, reps=r.per_round)
            r.record("attention_prefill_backward(packed)", shape, be, ms["packed"], flops=2.5 * flops,
                     vs_padded=ms["padded"] / ms["packed"])
            r.record("attention_prefill_backward(padded)", shape, be, ms["padded"], flops=2.5 * flops)


def _timed_backward(r: Runner, outs, leaves, grads) -> float:
    """Median ms of the backward alone, from a forward recorded once."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    return r.time(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True))


def _sdpa_flash_context(device: torch.device):
    """SDPA restricted to its flash backend on CUDA (the baseline); the default choice elsewhere."""
    import contextlib
    if device.type != "cuda":
        return contextlib.nullcontext(), "sdpa"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION), "sdpa_flash"


def bench_prefill_backward(r: Runner, dtype):
    shapes = [(2, 4, 2, 64, 64)] if r.quick else [(4, 32, 8, 2048, 128), (2, 32, 8, 4096, 128),
                                                   (4, 32, 32, 2048, 128)]
    for b, hq, hkv, s, d in shapes:
        q, k, v = (_rand(b, h, s, d, dtype=dtype, device=r.device).requires_grad_() for h in (hq, hkv, hkv))
        g = _rand(b, hq, s, d, dtype=dtype, device=r.device)
        shape = f"B{b} H{hq}/{hkv} S{s} D{d} causal"
        flops = 2.5 * 4 * b * hq * s * s * d / 2
        ms = {}
        for be in ("torch", "triton"):
            ok, _ = dispatch.backend_status(be, r.device)
            if not ok or (be == "torch" and s > 2048 and not r.quick):
                continue  # the reference materialises B·H·S² scores (and their gradient)
            fn = ops.resolve("attention_prefill", r.device, be)[1]
            ms[be] = _timed_backward(r, fn(q, k, v, causal=True), [q, k, v], [g])
        ctx, name = _sdpa_flash_context(r.device)
        with ctx:
            try:
                ke, ve = k, v
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                       enable_gqa=hq != hkv)
            except RuntimeError:  # a flash build without GQA: the KV heads expanded, as a user would
                ke, ve = (t.detach().repeat_interleave(hq // hkv, 1).requires_grad_() for t in (k, v))
                out = torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
            ms[name] = _timed_backward(r, out, [q, ke, ve], [g])
        for impl, t in ms.items():
            extra = {"vs_sdpa_flash": ms[name] / t} if impl == "triton" and name == "sdpa_flash" else {}
            r.record("attention_prefill_backward", shape, impl, t, flops=flops, **extra)


def bench_norms_backward(r: Runner, dtype):
    rows, hidden = (64, 512) if r.quick else (16384, 4096)
    el = torch.empty(0, dtype=dtype).element_size()
    shape = f"{rows}x{hidden}"
    for op, residual in (("rms_norm", False), ("rms_norm", True), ("layer_norm", False)):
        x = _rand(rows, hidden, dtype=dtype, device=r.device).requires_grad_()
        res = torch.randn_like(x).requires_grad_() if residual else None
        w = _rand(hidden, dtype=dtype, device=r.device).requires_grad_()
        leaves = [t for t in (x, res, w) if t is not None]
        grads = [torch.randn_like(x) for _ in range(2 if residual else 1)]
        # bytes: read h and dy (and dh), write dx (and dresidual); the weight partials are small
        nbytes = (5 if residual else 3) * x.numel() * el
        name = op + ("+residual" if residual else "") + "_backward"
        for be in ("torch", "triton"):
            ok, _ = dispatch.backend_status(be, r.device)
            if not ok:
                continue
            fn = ops.resolve(op, r.device, be)[1]
            outs = fn(x, w, 1e-6, res) if op == "rms_norm" else fn(x, w, None, 1e-5, res)
            r.record(name, shape, be, _timed_backward(r, outs, leaves, grads), nbytes=nbytes)


def preference_table(rows: List[dict]) -> Dict[str, List[str]]:
    """Per op, the fused backends ordered by total time over the shapes all of them ran."""
    order: Dict[str, List[str]] = {}
    ops_seen = sorted({r["op"] for r in rows if r["impl"] in ("torch", "triton", "cuda")})
    for op in ops_seen:
        op_rows = [r for r in rows if r["op"] == op and r["impl"] in ("torch", "triton", "cuda")]
        impls = sorted({r["impl"] for r in op_rows})
        shapes = [s for s in {r["shape"] for r in op_rows}
                  if all(any(r["shape"] == s and r["impl"] == i for r in op_rows) for i in impls)]
        total = {i: sum(r["median_ms"] for r in op_rows if r["impl"] == i and r["shape"] in shapes) for i in impls}
        if op in ops.OPS:  # variants such as "rms_norm+residual" are informative only
            order[op] = sorted(impls, key=lambda i: total[i])
    return order


def write_table(table_dir: str, r: Runner, quick: bool) -> str:
    """Write (or update) the device's table: the ops ranked in this run replace their old entries,
    other ops keep theirs, so runs of different groups (the GPU suite's stages) add up."""
    os.makedirs(table_dir, exist_ok=True)
    path = os.path.join(table_dir, dispatch.device_slug(r.info["device"]) + ".json")
    ranked = {}
    if os.path.exists(path):
        with open(path) as f:
            ranked = json.load(f).get("ops", {})
    ranked.update(preference_table(r.rows))
    with open(path, "w") as f:
        json.dump({"device": r.info["device"], "date": r.info["date"], "quick": quick, "ops": ranked}, f, indent=1)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke test; CPU ok)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results", default=RESULTS, help="JSONL file the rows are appended to")
    ap.add_argument("--table-dir", default=None,
                    help=f"where to write the backend preference table (default on CUDA: {TABLES}; "
                         "on CPU no table unless given)")
    ap.add_argument("--only", default="prefill,decode,lora,norms,prefill_bwd,norms_bwd,paged_decode,paged_extend,"
                    "window,packed",
                    help="comma list of benchmark groups")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible; use --device cpu --quick")
    if device.type == "cpu" and not args.quick:
        print("note: on the CPU only --quick makes sense; the numbers only show that the code runs")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    table_dir = args.table_dir or (TABLES if device.type == "cuda" else None)
    r = Runner(device, args.quick)
    groups = {"prefill": bench_prefill, "decode": bench_decode, "lora": bench_lora,
              "norms": bench_norms_rotary_append, "prefill_bwd": bench_prefill_backward,
              "norms_bwd": bench_norms_backward, "paged_decode": bench_paged_decode,
              "paged_extend": bench_paged_extend, "window": bench_window, "packed": bench_packed}
    written = 0
    for name in args.only.split(","):
        groups[name.strip()](r, dtype)
        # append after every group: a run cut short by a time limit keeps what it measured
        for row in r.rows[written:]:
            row["dtype"] = str(dtype).replace("torch.", "")
            row["copy_gbps"] = r.copy_gbps
        append_jsonl(args.results, r.rows[written:])
        written = len(r.rows)
        if table_dir and preference_table(r.rows):  # a run of backward groups only has no op to rank
            write_table(table_dir, r, args.quick)
    print()
    print(markdown_table(r.rows, ["op", "shape", "impl", "median_ms", "tflops", "gbps", "pct_of_copy",
                                  "overhead_pct", "vs_sdpa_flash", "vs_dense", "pct_of_same_copy", "vs_full",
                                  "ideal_vs_full", "vs_padded"]))
    print(f"\nappended {len(r.rows)} rows to {args.results}")
    if table_dir and preference_table(r.rows):
        print(f"wrote backend preference table {write_table(table_dir, r, args.quick)}")
    return r.rows


if __name__ == "__main__":
    main()
