"""Generation throughput: HybridEngine.generate vs HF generate (dynamic cache, and static cache).

Same model, batch and lengths for every implementation, greedy, every sequence forced to the
full length (no early EOS), timed interleaved (hf, hf-static, engine, hf, ...) so load from
other jobs on a shared machine hits all of them alike; medians of --runs. Prints a table and
appends one JSON row per (model, implementation) to benchmarks/results/generation.jsonl.

    python benchmarks/generation.py                       # CPU preset: default tiny + llama-110m
    python benchmarks/generation.py --models llama-110m --runs 7 --threads 2
    python benchmarks/generation.py --gpu                 # OPT-1.3B, batch 32, 256 + 256, bf16
    python benchmarks/generation.py --models mistral-sw-110m   # past a sliding window (48)
    python benchmarks/generation.py --workload long-tail   # continuous vs static batching
    python benchmarks/generation.py --workload grpo-groups # G answers: shared vs repeated prompts

The rollout workloads (`--workload long-tail | grpo-groups`) are described in
rollout_workloads.py; they write their rows to the same file with a `workload` field.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common import append_jsonl, git_commit, machine_load, versions
from fastrlhf.tasks.default_task import default_model_dir
from fastrlhf.hybrid_engine import EngineConfig, HybridEngine

HERE = os.path.dirname(os.path.abspath(__file__))

# random-weight configs by name; "default" is the project's tiny default model when present
MODEL_CONFIGS = {
    "llama-3m": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=2048,
                               tie_word_embeddings=True, max_position_embeddings=1024)),
    "llama-110m": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                                 tie_word_embeddings=True, max_position_embeddings=2048)),
    "opt-125m": ("opt", dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                             word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)),
    "llama-1.3b": ("llama", dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22,
                                 num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                 tie_word_embeddings=False, max_position_embeddings=2048)),
    # sliding-window models: Mistral's shape (GQA, a window on every layer) scaled down, with windows
    # shorter than prompt + new tokens (CPU: 64 + 64 over a window of 48; GPU preset: 256 + 256 over 128)
    "mistral-sw-110m": ("mistral", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                        num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                        sliding_window=48, max_position_embeddings=2048)),
    "mistral-sw-1.3b": ("mistral", dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22,
                                        num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                        sliding_window=128, max_position_embeddings=4096)),
}


def build_model(name: str, dtype: torch.dtype, device: str):
    if name == "default":  # the bundled tiny Llama of the default task
        cfg = AutoConfig.from_pretrained(default_model_dir())
    else:
        family, kw = MODEL_CONFIGS[name]
        cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with tempfile.TemporaryDirectory() as d:  # the real loading path, as users get it
        model.save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    return model.to(device).eval()


def make_prompts(vocab: int, batch: int, prompt_len: int, device: str):
    """Left-padded prompts of varied lengths (full length down to half), as a tokenizer makes."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    for i in range(batch):
        pad = (i * prompt_len) // (2 * batch)
        ids[i, :pad] = 0
        mask[i, :pad] = 0
    return ids.to(device), mask.to(device)


def timed(fn, device: str):
    """(wall seconds, CPU seconds of this process). On a shared CPU the CPU time is the steadier
    measure of the work done; wall time is what a user waits."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def logprob_gap(model, engine, ids, mask, new_tokens: int) -> float:
    """Max |log-prob from generation - log-prob from a training-style forward| of the sampled tokens."""
    out = engine.generate(ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=1,
                          eos_token_id=[], pad_token_id=0, return_logprobs=True)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], dim=1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=full_mask, position_ids=pos).logits
    p = ids.shape[1]
    lp = torch.log_softmax(logits[:, p - 1:-1].float(), -1).gather(-1, seq[:, p:, None])[..., 0]
    return (lp - out.logprobs).abs().max().item()


def bench_model(name, args, device, dtype):
    model = build_model(name, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    ids, mask = make_prompts(model.config.vocab_size, args.batch, args.prompt_len, device)
    n_new = args.new_tokens
    engine = HybridEngine(model, None, EngineConfig(cuda_graphs=not args.no_graphs))
    fused = bool(engine.config.fuse_projections)
    alt = HybridEngine(model, None, EngineConfig(cuda_graphs=not args.no_graphs, fuse_projections=not fused))
    impls = {
        "hf": lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                     min_new_tokens=n_new, do_sample=False, pad_token_id=0),
        "hf-static": lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new,
                                            min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                            cache_implementation="static"),
        "engine": lambda: engine.generate(ids, mask, max_new_tokens=n_new, do_sample=False,
                                          eos_token_id=[], pad_token_id=0),
        # the engine with the other fuse_projections setting than its config's, to measure
        # whether concatenating q/k/v and gate/up (a weight copy per generate) pays
        "engine-alt": lambda: alt.generate(ids, mask, max_new_tokens=n_new, do_sample=False,
                                           eos_token_id=[], pad_token_id=0),
    }
    for skip in args.skip:
        impls.pop(skip, None)
    with torch.no_grad():
        for fn in impls.values():  # warm-up: allocations, lazy init, graph capture paths
            fn()
        times = {k: [] for k in impls}
        cpu = {k: [] for k in impls}
        for _ in range(args.runs):
            for k, fn in impls.items():
                wall_s, cpu_s = timed(fn, device)
                times[k].append(wall_s)
                cpu[k].append(cpu_s)
        gap = logprob_gap(model, engine, ids, mask, min(n_new, 32))
    rows = []
    base = statistics.median(times["hf"]) if "hf" in times else None
    base_cpu = statistics.median(cpu["hf"]) if "hf" in cpu else None
    for k, ts in times.items():
        med = statistics.median(ts)
        med_cpu = statistics.median(cpu[k])
        impl = k
        if k.startswith("engine"):
            impl = f"engine-{'fused' if fused == (k == 'engine') else 'nofuse'}"
            impl += "" if k == "engine" else "(alt)"
        rows.append(dict(model=name, params_m=round(n_params / 1e6, 1), impl=impl, batch=args.batch,
                         prompt_len=args.prompt_len, new_tokens=n_new, dtype=str(dtype).split(".")[-1],
                         median_s=round(med, 4), tokens_per_s=round(args.batch * n_new / med, 1),
                         speedup_vs_hf=None if base is None else round(base / med, 3),
                         cpu_median_s=round(med_cpu, 4),
                         cpu_speedup_vs_hf=None if base_cpu is None else round(base_cpu / med_cpu, 3),
                         runs=args.runs, all_s=[round(t, 4) for t in ts],
                         logprob_max_abs_diff=gap if k == "engine" else None,
                         lean_cpu_decode=getattr(engine.config, "lean_cpu_decode", None) if k.startswith("engine") else None))
    del engine, model
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"default (tiny project model) and/or {', '.join(MODEL_CONFIGS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    ap.add_argument("--skip", nargs="*", default=[], help="implementations to skip (hf-static, ...)")
    ap.add_argument("--no-graphs", action="store_true", help="disable CUDA graphs in the engine")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU preset: opt-1.3b, batch 32, 256 prompt + 256 new tokens, bf16")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "generation.jsonl"))
    ap.add_argument("--workload", default="throughput", choices=["throughput", "long-tail", "grpo-groups", "rollout-path"],
                    help="throughput: engine vs HF generate (default); long-tail / grpo-groups / rollout-path: "
                         "the rollout workloads of rollout_workloads.py on the bundled task's SFT model")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastrlhf_rollout_bench"),
                    help="rollout workloads: where the SFT model is trained once")
    ap.add_argument("--sft_model", default=None, help="rollout workloads: an SFT model dir instead")
    ap.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=8,
                    help="long-tail: rows decoding at once (the prompts are 4x this)")
    ap.add_argument("--group-size", dest="group_size", type=int, default=8, help="grpo-groups, rollout-path: G")
    ap.add_argument("--prompts", type=int, default=16, help="grpo-groups, rollout-path: prompts (x G sequences)")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout workloads: sampling temperature")
    ap.add_argument("--note", default="", help="recorded in every row, e.g. '2-core CPU VM, shared with other jobs'")
    args = ap.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device; this machine has none")
        args.models = args.models or ["opt-1.3b"]
        args.batch, args.prompt_len, args.new_tokens = 32, 256, 256
        args.dtype = args.dtype or "bfloat16"
    device = "cuda" if args.gpu else "cpu"
    dtype = getattr(torch, args.dtype or "float32")
    models = args.models or ["default", "llama-110m"]
    torch.set_num_threads(args.threads)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    from fastrlhf import ops
    backend = ops.resolve("attention_decode", torch.device(device))[0]
    load = machine_load(warn=device == "cpu")
    all_rows = []
    if args.workload != "throughput":
        from rollout_workloads import run_workload
        for row in run_workload(args, device, dtype):
            row.update(device=dev_name, note=args.note, date=date, ops_backend=backend, commit=commit,
                       **versions(), **load)
            all_rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_s")}))
        append_jsonl(args.out, all_rows)
        return all_rows
    for name in models:
        for row in bench_model(name, args, device, dtype):
            row.update(device=dev_name, note=args.note, date=date, ops_backend=backend, commit=commit,
                       **versions(), **load)
            all_rows.append(row)
    print(f"\ndevice: {dev_name}  date: {date}  ops backend: {backend}")
    print(f"{'model':<12}{'params(M)':>10}{'impl':>20}{'tok/s':>10}{'median s':>10}{'x hf':>7}"
          f"{'cpu s':>9}{'cpu x hf':>9}{'lp diff':>10}")
    for r in all_rows:
        lp = "" if r["logprob_max_abs_diff"] is None else f"{r['logprob_max_abs_diff']:.1e}"
        sp = "" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}"
        csp = "" if r["cpu_speedup_vs_hf"] is None else f"{r['cpu_speedup_vs_hf']:.2f}"
        print(f"{r['model']:<12}{r['params_m']:>10}{r['impl']:>20}{r['tokens_per_s']:>10}"
              f"{r['median_s']:>10}{sp:>7}{r['cpu_median_s']:>9}{csp:>9}{lp:>10}")
    append_jsonl(args.out, all_rows)
    return all_rows


if __name__ == "__main__":
    main()
