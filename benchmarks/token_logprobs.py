"""ops.token_logprobs against the unfused path, log_softmax(h·Wᵀ).gather: one training step
(forward + backward into hidden and weight), its peak memory, its time, and whether values and
gradients agree.

    python benchmarks/token_logprobs.py                      # CPU, fp32, N 8192, V 151,936, H 896
    python benchmarks/token_logprobs.py --device cuda --dtype bfloat16   # the GPU suite's row

Peak memory of the step is what the step adds on top of its inputs:
- CPU: each path runs in a fresh subprocess; the peak resident set during the step
  (getrusage's ru_maxrss) minus the resident set just before it. Large tensors are mmap'd and
  returned to the OS when freed, so the resident set follows the live tensors.
- CUDA: torch.cuda.max_memory_allocated() during the step minus the allocation before it.
The unfused fp32 step at the default shape needs about 15 GB (the [N, V] logits, their
log_softmax and two gradients of that size); the script refuses to start it with less
available memory than --min-free-gb. Agreement: ‖fused − unfused‖ / ‖unfused‖ of the
log-probs, d hidden and d weight (upstream gradients seeded random numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import common


def _inputs(n, v, h, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = torch.randn(v, h, generator=g).div_(h ** 0.5).to(device=device, dtype=dtype)  # no temporary
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    g_logp = torch.randn(n, generator=g).to(device)
    return hidden, weight, targets, g_logp


def _step(path, hidden, weight, targets, g_logp, backend):
    from fastrlhf import ops
    from fastrlhf.ops.logprobs_reference import unfused_token_logprobs
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if path == "fused":
        logp = ops.token_logprobs(h, w, targets, backend=backend)
    else:
        logp = unfused_token_logprobs(h, w, targets)
    (logp * g_logp).sum().backward()
    return logp.detach(), h.grad, w.grad


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """One path in this (fresh) process: time, peak memory of the step, outputs saved for comparison."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    inputs = _inputs(args.n, args.v, args.h, dtype, device)
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = _step(args.child, *inputs, args.backend)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save([t.float() for t in out], args.save)
    json.dump({"seconds": seconds, "peak_step_bytes": peak - before,
               "peak_before_step_bytes": peak_before - before}, open(args.save + ".json", "w"))


def _run_child(path, args, tmp):
    save = os.path.join(tmp, f"{path}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--save", save, "--n", str(args.n),
           "--v", str(args.v), "--h", str(args.h), "--dtype", args.dtype, "--device", "cpu",
           "--backend", args.backend]
    subprocess.run(cmd, check=True)
    stats = json.load(open(save + ".json"))
    if stats["peak_before_step_bytes"] > 0:
        print(f"note: the {path} process peaked before its step too (+{stats['peak_before_step_bytes'] / 2**20:.0f} "
              "MiB over the inputs); its step peak may be under-measured", file=sys.stderr)
    return stats, save


def _check_memory(min_free_gb: float) -> None:
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if avail < min_free_gb * 2**30:
        sys.exit(f"only {avail / 2**30:.1f} GiB available; the unfused step needs about "
                 f"{min_free_gb:.1f} GiB at this shape (lower --n or --min-free-gb)")


def _gpu(args):
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    inputs = _inputs(args.n, args.v, args.h, dtype, device)
    res, outs = {}, {}
    for path in ("unfused", "fused"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs[path] = _step(path, *inputs, args.backend)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        outs[path] = [t.float() for t in outs[path]]
        timing = common.bench(lambda: _step(path, *inputs, args.backend), device, reps=10, warmup=2)
        res[path] = {"seconds": timing["median_ms"] / 1e3, "peak_step_bytes": peak}
    return res, outs["fused"], outs["unfused"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--h", type=int, default=896)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="ops backend of the fused path (auto: torch on the CPU)")
    p.add_argument("--min-free-gb", type=float, default=16.5,
                   help="CPU: refuse to run the unfused step with less available memory than this")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "token_logprobs.jsonl"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    device = torch.device(args.device)
    load = common.machine_load() if device.type == "cpu" else {}
    if device.type == "cuda":
        res, fused, unfused = _gpu(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = {}
            _check_memory(args.min_free_gb)
            res["unfused"], unfused_path = _run_child("unfused", args, tmp)
            res["fused"], fused_path = _run_child("fused", args, tmp)
            fused, unfused = torch.load(fused_path), torch.load(unfused_path)
    rel = {name: ((a.double() - b.double()).norm() / b.double().norm()).item()
           for name, a, b in zip(("logp", "d_hidden", "d_weight"), fused, unfused)}
    row = {"bench": "token_logprobs", "shape": f"N{args.n} V{args.v} H{args.h}", "dtype": args.dtype,
           "backend": args.backend, "step": "forward+backward",
           "fused_seconds": res["fused"]["seconds"], "unfused_seconds": res["unfused"]["seconds"],
           "fused_peak_mib": res["fused"]["peak_step_bytes"] / 2**20,
           "unfused_peak_mib": res["unfused"]["peak_step_bytes"] / 2**20,
           "memory_ratio": res["fused"]["peak_step_bytes"] / res["unfused"]["peak_step_bytes"],
           "speed_ratio": res["unfused"]["seconds"] / res["fused"]["seconds"],
           **{f"rel_err_{k}": v for k, v in rel.items()}, **load, **common.device_info(device)}
    print(json.dumps(row, indent=1))
    if not args.no_save:
        common.append_jsonl(args.out, [row])


if __name__ == "__main__":
    main()
