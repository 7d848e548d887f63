"""Tensor-parallel generation: per-rank memory and time per token, tp_size=1 vs tp_size=N.

Run under a launcher, one process per rank (the CPU: gloo; GPUs: NCCL):

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/tp_generation.py
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/tp_generation.py --models default --runs 3

Every rank holds `--batch` prompts. `tp1`: each rank generates its own prompts alone (the whole
model). `tpN-vocab` / `tpN-replicated`: groups of N ranks generate the union of their prompts on
1/N shards, with the vocabulary-parallel or the replicated lm_head (EngineConfig.tp_lm_head).
Per rank: generation memory = the bytes of the weights its forward reads + its KV cache
(HybridEngine.memory_footprint: under ZeRO-3 these weight bytes are what is gathered; without
ZeRO they are views of the training weights), and time per decode step. A step of tpN does the
same FLOPs per rank as tp1 (N times the rows on 1/N of the weights) plus 2 all-reduces per layer
and the embedding / logits exchanges, so on CPU cores it is not faster: the point of TP is memory.
Configurations are timed interleaved (tp1, tpN-vocab, tpN-replicated, tp1, ...), medians of --runs.
Rank 0 prints a table and appends rows to benchmarks/results/tp_generation.jsonl.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from common import append_jsonl, git_commit, machine_load, versions
from generation import MODEL_CONFIGS, build_model, make_prompts
from fastrlhf.hybrid_engine import EngineConfig, HybridEngine

HERE = os.path.dirname(os.path.abspath(__file__))


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench_model(name, model, args, device, dtype, tp):
    n_params = sum(p.numel() for p in model.parameters())
    rank = dist.get_rank()
    ids, mask = make_prompts(model.config.vocab_size, args.batch, args.prompt_len, device)
    ids = ids.roll(rank, 0)  # different prompts (same lengths) per rank
    engines = {"tp1": HybridEngine(model, None, EngineConfig())}
    for head in ("vocab_parallel", "replicated"):
        engines[f"tp{tp}-{head.split('_')[0]}"] = HybridEngine(model, None, EngineConfig(tp_size=tp, tp_lm_head=head))
    n = args.new_tokens
    kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)
    memory, times, tokens = {}, {k: [] for k in engines}, {}
    with torch.no_grad():
        for k, eng in engines.items():  # warm-up, and the memory of a generate in progress
            with eng.inference():
                out = eng.generate(ids, mask, **kw)
                memory[k] = eng.memory_footprint()
            tokens[k] = out.sequences
        for _ in range(args.runs):
            for k, eng in engines.items():
                dist.barrier()
                t0 = time.perf_counter()
                eng.generate(ids, mask, **kw)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(_max_over_ranks(time.perf_counter() - t0))  # the slowest rank's
    same = {k: bool(torch.equal(t, tokens["tp1"])) for k, t in tokens.items()}
    rows = []
    base = statistics.median(times["tp1"])
    for k in engines:
        med = statistics.median(times[k])
        mem = memory[k]
        rows.append(dict(model=name, params_m=round(n_params / 1e6, 1), impl=k, world=dist.get_world_size(),
                         tp_size=1 if k == "tp1" else tp, batch_per_rank=args.batch, prompt_len=args.prompt_len,
                         new_tokens=n, dtype=str(dtype).split(".")[-1],
                         weights_mb=round(mem["weights"] / 2 ** 20, 2), kv_cache_mb=round(mem["kv_cache"] / 2 ** 20, 2),
                         memory_mb=round((mem["weights"] + mem["kv_cache"]) / 2 ** 20, 2),
                         median_s=round(med, 4), ms_per_token=round(1000 * med / n, 2),
                         time_vs_tp1=round(med / base, 3), tokens_same_as_tp1=same[k],
                         runs=args.runs, all_s=[round(t, 4) for t in times[k]]))
    for r in rows:
        r["memory_vs_tp1"] = round(r["memory_mb"] / rows[0]["memory_mb"], 3)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default", "llama-110m"],
                    help=f"default (tiny project model) and/or {', '.join(MODEL_CONFIGS)}")
    ap.add_argument("--tp", type=int, default=None, help="tp_size (default: the world size)")
    ap.add_argument("--batch", type=int, default=4, help="prompts per rank")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per rank (CPU)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tp_generation.jsonl"))
    args = ap.parse_args(argv)
    from fastrlhf.utils.distributed import init_distributed
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # built before the process group exists: HF's save_pretrained (in build_model's load round trip)
    # writes on the main process only once torch.distributed is up
    models = {name: build_model(name, dtype, "cpu") for name in args.models}
    init_distributed()
    models = {name: m.to(device) for name, m in models.items()}
    if dist.get_world_size() < 2:
        sys.exit("run under a launcher with >= 2 processes: python -m torch.distributed.run --nproc_per_node 2 "
                 "benchmarks/tp_generation.py")
    tp = args.tp or dist.get_world_size()
    torch.set_num_threads(args.threads)
    rank0 = dist.get_rank() == 0
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load = machine_load(warn=rank0 and device == "cpu")
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, {args.threads} thread/rank)"
    rows = []
    for name, model in models.items():
        for r in bench_model(name, model, args, device, dtype, tp):
            r.update(device=dev_name, date=date, commit=git_commit(), **versions(), **load)
            rows.append(r)
    if rank0:
        print(f"\ndevice: {dev_name}  world: {dist.get_world_size()}  date: {date}")
        print(f"{'model':<12}{'impl':>18}{'weights MB':>12}{'KV MB':>8}{'mem x tp1':>10}{'ms/token':>10}"
              f"{'time x tp1':>11}{'same tokens':>12}")
        for r in rows:
            print(f"{r['model']:<12}{r['impl']:>18}{r['weights_mb']:>12}{r['kv_cache_mb']:>8}{r['memory_vs_tp1']:>10}"
                  f"{r['ms_per_token']:>10}{r['time_vs_tp1']:>11}{str(r['tokens_same_as_tp1']):>12}")
        append_jsonl(args.out, rows)
    dist.barrier()
    return rows


if __name__ == "__main__":
    main()
