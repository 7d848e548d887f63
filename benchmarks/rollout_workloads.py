"""Rollout workloads of `benchmarks/generation.py --workload ...` (the rollout-engine issue).

- `long-tail`: the bundled task's SFT model samples answers (--temperature, EOS on) for 4x more
  prompts than `max_batch_size`; answers end at different lengths (at temperature 1 the bundled
  model's answers are 1-26 tokens; at 2, 8-89: a long tail). Tokens/s with continuous
  batching vs `continuous_batching=False` (static batches of max_batch_size rows, each run until
  its longest answer ends), same model, prompts and seeds (so the very same tokens), interleaved.
- `grpo-groups`: G answers per prompt (GRPO's group) with `num_return_sequences=G` (the prompt
  computed once, its blocks shared) vs the prompts repeated G times. Prefill time (a generate of
  one new token: the prompts' forward, plus each shared answer's last prompt token), prompt KV
  memory (peak pool blocks of that call) and a whole rollout's tokens/s.
- `rollout-path`: the trainer's rollout call (`ExperienceMaker.rollout`: G answers per prompt,
  engine log-probs) vs the same engine's `generate` on the same tensors and seeds (the time the
  rollout path adds around the engine) vs `inject(model, generate=True)` + HF's `generate`.

The first two report peak KV-cache bytes: the new engine's peak of blocks in use, and the first engine's
dense cache for the same call (its allocation rule: layers x 2 x rows x KV heads x (padded prompt +
max new) x head dim x bytes; it had no row limit, so all rows at once).

The SFT model is trained once into --workdir with `fastrlhf sft` (the bundled task's default
profile) unless --sft_model is given.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch


def sft_model(args) -> str:
    if args.sft_model:
        return args.sft_model
    out = os.path.join(args.workdir, "sft")
    if not os.path.isfile(os.path.join(out, "config.json")):
        os.makedirs(args.workdir, exist_ok=True)
        print(f"training the bundled task's SFT model into {out} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "fastrlhf.cli", "sft", "--output_dir", out, "--resume", "no"],
                       check=True)
    return out


def prompts(tok, n: int, skip: int = 0):
    """The first n prompts of the bundled task through the chat template, left-padded."""
    from fastrlhf.tasks.default_task import default_data_path
    with open(default_data_path()) as f:
        rows = [json.loads(line) for _, line in zip(range(skip + n), f)][skip:]
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for r in rows]
    width = max(len(x) for x in ids)
    input_ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def dense_kv_bytes(model, rows: int, width: int) -> int:
    """The first engine's cache for `rows` rows of `width` columns (prompt + new tokens)."""
    from fastrlhf.hybrid_engine import spec_for
    spec = spec_for(model.config)
    elem = next(model.parameters()).element_size()
    return model.config.num_hidden_layers * 2 * rows * spec.n_kv_heads * width * spec.head_dim * elem


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def interleaved(impls: dict, runs: int):
    """{name: (fn)} -> {name: {"wall": [...], "cpu": [...], "out": last output}}, runs interleaved."""
    res = {k: {"wall": [], "cpu": [], "out": None} for k in impls}
    for fn in impls.values():
        fn()  # warm-up
    for _ in range(runs):
        for k, fn in impls.items():
            wall, cpu, out = timed(fn)
            res[k]["wall"].append(wall)
            res[k]["cpu"].append(cpu)
            res[k]["out"] = out
    return res


def _generated(out, prompt_width: int, pad: int, eos):
    """Real new tokens (EOS included, pads after it excluded) of a GenerationOutput."""
    new = out.sequences[:, prompt_width:]
    n = 0
    for row in new.tolist():
        for t in row:
            n += 1
            if t in eos:
                break
    return n


def long_tail(args, model, tok, device):
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    rows = args.max_batch_size
    ids, mask = prompts(tok, 4 * rows)
    ids, mask = ids.to(device), mask.to(device)
    eos = {tok.eos_token_id}
    kw = dict(max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, generator=list(range(ids.shape[0])))
    engines = {"continuous": HybridEngine(model, tok, EngineConfig(max_batch_size=rows)),
               "static": HybridEngine(model, tok, EngineConfig(max_batch_size=rows, continuous_batching=False))}
    stats = {}

    def run(name):
        def fn():
            out = engines[name].generate(ids, mask, **kw)
            stats[name] = dict(engines[name].last_stats)
            return out
        return fn
    with torch.no_grad():
        res = interleaved({k: run(k) for k in engines}, args.runs)
    same = torch.equal(res["continuous"]["out"].sequences, res["static"]["out"].sequences)
    lengths = [min(len(r), r.index(tok.eos_token_id) + 1) if tok.eos_token_id in r else len(r)
               for r in res["continuous"]["out"].sequences[:, ids.shape[1]:].tolist()]
    n_tok = _generated(res["continuous"]["out"], ids.shape[1], tok.pad_token_id, eos)
    old = dense_kv_bytes(model, ids.shape[0], ids.shape[1] + args.new_tokens)
    base = statistics.median(res["static"]["wall"])
    out_rows = []
    for k in engines:
        med = statistics.median(res[k]["wall"])
        out_rows.append(dict(
            workload="long-tail", impl=f"engine-{k}", prompts=ids.shape[0], max_batch_size=rows,
            temperature=args.temperature,
            prompt_len=ids.shape[1], max_new_tokens=args.new_tokens, generated_tokens=n_tok,
            answer_len_min=min(lengths), answer_len_median=statistics.median(lengths), answer_len_max=max(lengths),
            median_s=round(med, 4), tokens_per_s=round(n_tok / med, 1), speedup_vs_static=round(base / med, 3),
            cpu_median_s=round(statistics.median(res[k]["cpu"]), 4),
            cpu_speedup_vs_static=round(statistics.median(res["static"]["cpu"]) /
                                        statistics.median(res[k]["cpu"]), 3),
            decode_steps=stats[k]["steps"], peak_kv_bytes=stats[k]["peak_kv_bytes"],
            pool_bytes=stats[k]["pool_bytes"], old_engine_kv_bytes=old, same_tokens_both_modes=same,
            runs=args.runs, all_s=[round(t, 4) for t in res[k]["wall"]]))
    return out_rows


def grpo_groups(args, model, tok, device):
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    g, n = args.group_size, args.prompts
    ids, mask = prompts(tok, n, skip=1000)
    ids, mask = ids.to(device), mask.to(device)
    rep_ids, rep_mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    engine = HybridEngine(model, tok, EngineConfig())
    seeds = list(range(n * g))
    stats = {}

    def gen(name, new):
        def fn():
            common = dict(max_new_tokens=new, do_sample=True, temperature=args.temperature, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, generator=seeds)
            out = (engine.generate(ids, mask, num_return_sequences=g, **common) if name == "shared"
                   else engine.generate(rep_ids, rep_mask, **common))
            stats[(name, new)] = dict(engine.last_stats)
            return out
        return fn
    with torch.no_grad():
        pre = interleaved({"shared": gen("shared", 1), "repeated": gen("repeated", 1)}, args.runs)
        full = interleaved({"shared": gen("shared", args.new_tokens), "repeated": gen("repeated", args.new_tokens)},
                           args.runs)
    same = torch.equal(full["shared"]["out"].sequences, full["repeated"]["out"].sequences)
    n_tok = _generated(full["shared"]["out"], ids.shape[1], tok.pad_token_id, {tok.eos_token_id})
    block_bytes = engine._cache.block_bytes
    prompt_real = int(mask.sum())
    out_rows = []
    for k in ("shared", "repeated"):
        pre_med, full_med = statistics.median(pre[k]["wall"]), statistics.median(full[k]["wall"])
        out_rows.append(dict(
            workload="grpo-groups", impl=f"engine-{k}-prompts", prompts=n, group_size=g, prompt_len=ids.shape[1],
            temperature=args.temperature,
            prompt_tokens=prompt_real, max_new_tokens=args.new_tokens, kv_block_size=engine.config.kv_block_size,
            prefill_median_s=round(pre_med, 4),
            prefill_speedup_vs_repeated=round(statistics.median(pre["repeated"]["wall"]) / pre_med, 3),
            prefill_tokens_computed=stats[(k, 1)]["prefill_tokens"],
            prompt_kv_bytes=stats[(k, 1)]["peak_kv_blocks"] * block_bytes,
            prompt_kv_ratio_vs_repeated=round(stats[(k, 1)]["peak_kv_blocks"] /
                                              stats[("repeated", 1)]["peak_kv_blocks"], 4),
            prompt_kv_bound=round(1 / g + n * g / stats[("repeated", 1)]["peak_kv_blocks"], 4),
            rollout_median_s=round(full_med, 4), rollout_tokens_per_s=round(n_tok / full_med, 1),
            rollout_cpu_median_s=round(statistics.median(full[k]["cpu"]), 4),
            prefill_cpu_median_s=round(statistics.median(pre[k]["cpu"]), 4),
            rollout_speedup_vs_repeated=round(statistics.median(full["repeated"]["wall"]) / full_med, 3),
            peak_kv_bytes=stats[(k, args.new_tokens)]["peak_kv_bytes"],
            old_engine_kv_bytes=dense_kv_bytes(model, n * g, ids.shape[1] + args.new_tokens),
            same_tokens_both_ways=same, runs=args.runs,
            prefill_all_s=[round(t, 4) for t in pre[k]["wall"]]))
    return out_rows


def rollout_path(args, model, tok, device):
    """What the trainer's rollout call adds around the engine: `ExperienceMaker.rollout` (a
    PromptCollator batch, G answers per prompt, the engine's log-probs, the masks it builds) vs
    the same engine's `generate` on the same tensors and seeds (so the same tokens), and the model
    driven as another trainer drives it, `inject(model, generate=True)` + `model.generate`
    (HF's arguments, sampling seeded by torch.manual_seed: other tokens, so its row says how many)."""
    import copy
    from types import SimpleNamespace

    from fastrlhf import inject
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.experience import ExperienceMaker
    g, n = args.group_size, args.prompts
    ids, mask = prompts(tok, n, skip=2000)
    items = [{"prompt": "", "prompt_input_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    cfg = PPOConfig(model_name_or_path=sft_model(args), reward_model=sft_model(args), algo="grpo", group_size=g,
                    rollout_batch_size=n, max_new_tokens=args.new_tokens, temperature=args.temperature,
                    output_dir=os.path.join(args.workdir, "unused"))
    maker = ExperienceMaker(cfg, SimpleNamespace(actor=SimpleNamespace(module=model), reward=None), tok,
                            torch.device(device), 0, args.new_tokens)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in maker.collate(items).items()}
    seeds = list(range(n * g))
    injected = inject(copy.deepcopy(model), generate=True)
    hf_kw = dict(max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, top_k=0,
                 num_return_sequences=g, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def via_inject():
        torch.manual_seed(0)
        return injected.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **hf_kw)
    impls = {
        "rollout": lambda: maker.rollout(batch, seeds, return_logprobs=True, group_size=g),
        "engine": lambda: maker.engine.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens=args.new_tokens, do_sample=True,
            temperature=args.temperature, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            generator=seeds, return_logprobs=True, num_return_sequences=g),
        "inject": via_inject,
    }
    with torch.no_grad():
        res = interleaved(impls, args.runs)
    width = batch["input_ids"].shape[1]
    seqs = {"rollout": res["rollout"]["out"].sequences, "engine": res["engine"]["out"].sequences,
            "inject": res["inject"]["out"]}
    base = statistics.median(res["engine"]["wall"])
    base_cpu = statistics.median(res["engine"]["cpu"])
    out_rows = []
    for k in impls:
        med, cpu = statistics.median(res[k]["wall"]), statistics.median(res[k]["cpu"])
        n_tok = _generated(SimpleNamespace(sequences=seqs[k]), width, tok.pad_token_id, {tok.eos_token_id})
        out_rows.append(dict(
            workload="rollout-path", impl={"rollout": "experience-maker-rollout", "engine": "engine-generate",
                                            "inject": "inject-hf-generate"}[k],
            prompts=n, group_size=g, max_new_tokens=args.new_tokens, temperature=args.temperature,
            generated_tokens=n_tok, median_s=round(med, 4), cpu_median_s=round(cpu, 4),
            overhead_vs_engine=round(med / base, 3), cpu_overhead_vs_engine=round(cpu / base_cpu, 3),
            same_tokens_as_engine=bool(torch.equal(seqs[k], seqs["engine"])), runs=args.runs,
            all_s=[round(t, 4) for t in res[k]["wall"]]))
    return out_rows


WORKLOADS = {"long-tail": long_tail, "grpo-groups": grpo_groups, "rollout-path": rollout_path}


def run_workload(args, device: str, dtype):
    from fastrlhf.models.loading import load_tokenizer
    from transformers import AutoModelForCausalLM
    path = sft_model(args)
    tok = load_tokenizer(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    rows = WORKLOADS[args.workload](args, model, tok, device)
    for r in rows:
        r["model"] = f"bundled SFT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"
    return rows
