"""The fused MoE kernel (ops.fused_moe, triton) against the grouped-GEMM roofline and baselines.

    python benchmarks/fused_moe.py --device cuda             # the GPU suite's rows (bf16)
    TRITON_INTERPRET=1 python benchmarks/fused_moe.py --quick --device cpu   # smoke run (fp32)

Shapes are published MoE layers (hidden H, expert intermediate I, experts E, top-k): Qwen3-30B-A3B
(2048, 768, 128, 8), OLMoE-1B-7B (2048, 1024, 64, 8), Mixtral-8x7B (4096, 14336, 8, 2), at
T tokens (64: a decode step of batch 64, the issue's target; and prefill-sized T). Routing is a
softmax top-k of random logits (about uniform over experts, as trained routers aim for).

The roofline of one call is max(FLOPs / peak, bytes / bandwidth), with
- FLOPs = 2·T·k·(2I·H + H·I) (the gate/up and down products of every routed row);
- bytes = the weights of the experts the batch actually hits (3·I·H each) + hidden in and out;
- peak = a dense bf16 GEMM (8192³, torch.mm) and bandwidth = a device-to-device copy, both
  measured in the same run (common.copy_bandwidth).
`pct_of_roofline` = roofline time / measured time (target at T = 64: >= 60%). Baselines in the same
run: `torch_grouped_mm` (tokens sorted by expert and two torch grouped matmuls, transformers 5's
default experts path) where this torch has `torch.nn.functional.grouped_mm`, and the torch reference
(a loop over experts) at small T. Rows go to benchmarks/results/fused_moe.jsonl (--out).
"""
from __future__ import annotations

import argparse
import os

import torch

from common import append_jsonl, bench, copy_bandwidth, device_info, markdown_table
from fastrlhf.ops import reference, triton_backend

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = {"qwen3-30b-a3b": (2048, 768, 128, 8), "olmoe-1b-7b": (2048, 1024, 64, 8),
          "mixtral-8x7b": (4096, 14336, 8, 2)}
QUICK = {"tiny": (64, 32, 8, 2)}


def inputs(t, h, i, e, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(device, dtype)
    down = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(device, dtype)
    weights, ids = torch.softmax(torch.randn(t, e, generator=g), -1).topk(k, -1)
    return x, ids.to(device), weights.to(device), gate_up, down


def grouped_mm_moe(x, ids, weights, gate_up, down):
    """The baseline: rows sorted by expert, torch grouped matmuls (no kernel fusion)."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    rows = x[order // k]
    gu = torch.nn.functional.grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)
    half = gu.shape[1] // 2
    act = torch.nn.functional.silu(gu[:, :half]) * gu[:, half:]
    y = torch.nn.functional.grouped_mm(act, down.transpose(1, 2), offs=offs)
    y = y.float() * weights.reshape(-1)[order, None]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, order // k, y).to(x.dtype)


def peak_matmul_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: torch.mm(a, a), device, reps=20, warmup=3)["median_ms"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    ap.add_argument("--tokens", default=None, help="comma-separated T values (default 64,512,4096; quick: 5,64)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fused_moe.jsonl"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layers = QUICK if args.quick else LAYERS
    tokens = [int(t) for t in (args.tokens or ("5,64" if args.quick else "64,512,4096")).split(",")]
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (8 << 20))  # GB/s
    peak = peak_matmul_tflops(device, dtype)
    info = device_info(device)
    has_grouped_mm = hasattr(torch.nn.functional, "grouped_mm")
    reps, warmup = (2, 1) if args.quick else (30, 3)
    rows = []
    with torch.no_grad():
        for name, (h, i, e, k) in layers.items():
            for t in tokens:
                x, ids, w, gu, dn = inputs(t, h, i, e, k, dtype, device)
                hit = int(torch.unique(ids).numel())
                flops = 2 * t * k * 3 * i * h
                nbytes = hit * 3 * i * h * gu.element_size() + 2 * t * h * x.element_size()
                roof_ms = max(flops / (peak * 1e12), nbytes / (bw * 1e9)) * 1e3
                impls = {"triton": lambda: triton_backend.fused_moe(x, ids, w, gu, dn)}
                if has_grouped_mm:
                    impls["torch_grouped_mm"] = lambda: grouped_mm_moe(x, ids, w, gu, dn)
                if t * k <= 64 * 8 or device.type == "cpu":
                    impls["reference"] = lambda: reference.fused_moe(x, ids, w, gu, dn)
                times = {n: bench(fn, device, reps=reps, warmup=warmup, cold_l2=True)["median_ms"]
                         for n, fn in impls.items()}
                for impl, ms in times.items():
                    rows.append({"bench": "fused_moe", "layer": name, "H": h, "I": i, "E": e, "top_k": k,
                                 "tokens": t, "experts_hit": hit, "dtype": str(dtype).split(".")[-1],
                                 "impl": impl, "median_ms": round(ms, 4),
                                 "tflops": round(flops / (ms * 1e-3) / 1e12, 3),
                                 "gbps": round(nbytes / (ms * 1e-3) / 1e9, 1),
                                 "roofline_ms": round(roof_ms, 4), "pct_of_roofline": round(100 * roof_ms / ms, 1),
                                 "x_vs_triton": round(ms / times["triton"], 3),
                                 "peak_tflops": round(peak, 1), "copy_gbps": round(bw, 1), **info})
    print(markdown_table(rows, ["layer", "tokens", "experts_hit", "impl", "median_ms", "tflops", "gbps",
                                "pct_of_roofline", "x_vs_triton"]))
    append_jsonl(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
