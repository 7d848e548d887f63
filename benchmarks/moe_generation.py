"""Mixture-of-experts generation: HybridEngine.generate vs HF generate on MoE configs.

The machinery of benchmarks/generation.py (same model, batch and lengths for every implementation,
greedy, every sequence forced to full length, implementations interleaved run by run so load from
other jobs hits all alike, medians; the engine's log-probs against a training forward) on random
MoE models of the shape of published ones, scaled down to run on a CPU:

- qwen3-moe-60m: Qwen3-MoE (per-head q/k norms, GQA), 4 layers, hidden 512, 32 experts of width
  256, top-4 renormalised (the published Qwen3-30B-A3B routes top-8 of 128 at hidden 2048);
- mixtral-25m: Mixtral, 4 layers, hidden 384, 8 experts of width 512, top-2;
- qwen2-moe-40m: Qwen2-MoE with its gated shared expert, 4 layers, hidden 384, 16 experts top-4.

HF runs transformers 5's default experts implementation (grouped_mm). Rows (one per model and
implementation) go to benchmarks/results/moe_generation.jsonl with --device-note naming the machine.

    python benchmarks/moe_generation.py --runs 7
    python benchmarks/moe_generation.py --models mixtral-25m --batch 4 --new-tokens 32
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generation  # noqa: E402  (benchmarks/generation.py: bench_model and the model registry)
from common import append_jsonl, git_commit, machine_load, versions  # noqa: E402

MOE_CONFIGS = {
    "qwen3-moe-60m": ("qwen3_moe", dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                        num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
                                        moe_intermediate_size=256, intermediate_size=1024, norm_topk_prob=True,
                                        vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=False)),
    "mixtral-25m": ("mixtral", dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                    intermediate_size=512, vocab_size=8192, max_position_embeddings=1024)),
    "qwen2-moe-40m": ("qwen2_moe", dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                                        num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
                                        moe_intermediate_size=256, shared_expert_intermediate_size=512,
                                        intermediate_size=1024, vocab_size=8192, max_position_embeddings=1024)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MOE_CONFIGS), help=", ".join(MOE_CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--device-note", default="2-core CPU VM, shared with other engineers' tests",
                    help="what the device field of the rows says about the machine")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "moe_generation.jsonl"))
    args = ap.parse_args(argv)
    generation.MODEL_CONFIGS.update(MOE_CONFIGS)
    torch.set_num_threads(args.threads)
    # generation.bench_model's options: no static-cache HF (MoE models refuse it in some releases)
    # and the engine with its default projection setting only
    args.skip, args.no_graphs = ["hf-static", "engine-alt"], True
    load = machine_load(warn=True)
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    rows = []
    for name in args.models:
        for row in generation.bench_model(name, args, "cpu", torch.float32):
            row.update(device=args.device_note, threads=args.threads, date=date, commit=git_commit(),
                       hf_experts_implementation="grouped_mm", **versions(), **load)
            rows.append(row)
    print(f"{'model':<16}{'params(M)':>10}{'impl':>16}{'tok/s':>10}{'median s':>10}{'x hf':>7}{'cpu x hf':>9}"
          f"{'lp diff':>10}")
    for r in rows:
        lp = "" if r["logprob_max_abs_diff"] is None else f"{r['logprob_max_abs_diff']:.1e}"
        sp = "" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}"
        csp = "" if r["cpu_speedup_vs_hf"] is None else f"{r['cpu_speedup_vs_hf']:.2f}"
        print(f"{r['model']:<16}{r['params_m']:>10}{r['impl']:>16}{r['tokens_per_s']:>10}{r['median_s']:>10}"
              f"{sp:>7}{csp:>9}{lp:>10}")
    append_jsonl(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
