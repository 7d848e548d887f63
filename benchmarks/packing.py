"""Training without padding: update-phase time and activation memory, packed vs padded, on the same
batches, interleaved in one process (the order alternates round by round).

Workloads (one JSON row per workload and variant, with the ratio against padded):
- grpo_arithmetic: the arithmetic task's GRPO profile (`tasks.arithmetic_task.PROFILES`: 16 prompts
  x 8 answers, mini-batches of 32 answers, answers up to 12 tokens, k3 KL loss against a
  reference), on an actor SFT-trained here (its SFT profile)
  for --sft_steps steps so that its answers have a trained model's lengths. Timed per round on one
  sampled rollout batch: the rollout-time passes (the actor's old log-probs and the reference's,
  `ExperienceMaker.experience`) and the update (`PPOTrainer.update`: the actor's passes and its
  optimizer steps).
- sft_default: the default task's SFT profile (micro-batches of 32), one optimizer step per round
  on the same data position for both variants.
- grpo_ragged: the issue's example of ragged RL batches, synthetic: answers of 5..200 tokens after
  the default task's prompts (random weights), the update of 64 answers in mini-batches of 32.

Time: median CPU seconds of this process (one thread; the work done, far less disturbed than the
wall clock when other jobs share the cores) and the wall-clock median. Memory: the peak of the
bytes autograd saves for backward in one pass (activations; CPU), or the peak CUDA allocation above
the weights and optimizer state (--gpu).

    python benchmarks/packing.py --workdir /tmp/packing_bench --rounds 7 --out benchmarks/results/packing.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from common import append_jsonl, device_info, machine_load, markdown_table

VARIANTS = {"padded": dict(packing=False, max_tokens_per_micro_batch=None),
            "packed": dict(packing=True, max_tokens_per_micro_batch=None),
            "packed_budget": dict(packing=True, max_tokens_per_micro_batch=512)}


class ActivationMeter:
    """Peak bytes saved for backward by one pass (the weights it saves left out): counted as the
    forward saves them, read and reset when the engine's backward starts (the moment a pass's
    activations peak)."""

    def __init__(self, engine):
        self.peak, self.now, self.seen = 0, 0, set()
        self.weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        backward = engine.backward

        def metered(loss, *a, **k):
            self.peak, self.now, self.seen = max(self.peak, self.now), 0, set()
            return backward(loss, *a, **k)
        engine.backward = metered

    def pack(self, t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self.seen and key[0] not in self.weights:
            self.seen.add(key)
            self.now += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def timed(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return out


def metered(fn: Callable[[], object], meter: ActivationMeter, device: torch.device) -> Dict[str, float]:
    """`timed(fn)` with the activation peak of its passes (CPU; on CUDA `timed` reads the allocator)."""
    with meter:
        out = timed(fn, device)
    if device.type != "cuda":
        out["peak_mib"] = meter.peak / 2 ** 20
    return out


def set_variant(cfg, name: str) -> None:
    for k, v in VARIANTS[name].items():
        setattr(cfg, k, v)


def interleave(rounds: int, names: List[str], one_round: Callable[[int, str], Dict[str, float]]):
    """{name: [per-round results]}, the variants' order reversed every other round."""
    out: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(one_round(r, n))
    return out


def summarise(workload: str, results, extra: Dict, device: torch.device) -> List[Dict]:
    rows = []
    for name, runs in results.items():
        row = {"workload": workload, "variant": name, "rounds": len(runs), **extra}
        for key in runs[0]:
            row[f"median_{key}"] = round(statistics.median(r[key] for r in runs), 4)
        rows.append(row)
    for row in rows:
        for key in [k for k in row if k.startswith("median_") and k.endswith("_s")]:
            row[f"speedup_{key[len('median_'):]}"] = round(rows[0][key] / max(row[key], 1e-9), 3)
    return rows


# ----------------------------------------------------------------------------- workloads

def grpo_arithmetic(args, device) -> List[Dict]:
    from fastrlhf.data import DataSpec, build_datasets
    from fastrlhf.tasks.arithmetic_task import PROFILES, arithmetic_data_path, arithmetic_model_dir
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import PPOConfig, SFTConfig
    from fastrlhf.rlhf.ppo import PPOTrainer
    from fastrlhf.rlhf.sft import train_sft
    spec = DataSpec(paths=[arithmetic_data_path()])
    sft_dir = os.path.join(args.workdir, f"arith_sft_{args.sft_steps}")
    if not os.path.isfile(os.path.join(sft_dir, "config.json")):
        # the task's SFT profile, fewer steps: enough for answers of a trained model's lengths
        train_sft(SFTConfig(**{**PROFILES["sft"], "model_name_or_path": arithmetic_model_dir(), "output_dir": sft_dir,
                               "data": spec, "max_steps": args.sft_steps, "eval_max_batches": 1, "log_steps": 50,
                               "cpu_threads": args.threads, "resume": "no", "save_steps": 0}))
    tok = load_tokenizer(sft_dir, padding_side="left")
    prompts, _ = build_datasets(spec, tok, 3)
    items = [prompts[i] for i in range(len(prompts))]
    cfg = PPOConfig(**{**PROFILES["ppo"], "model_name_or_path": sft_dir, "data": spec, "max_steps": 1000,
                       "eval_prompts": 0, "seed": 1, "resume": "no", "save_steps": 0, "cpu_threads": args.threads,
                       "output_dir": os.path.join(args.workdir, f"grpo_out{os.getpid()}")})
    trainer = PPOTrainer(cfg, prompts=items, eval_prompts=items[:1])
    meter = ActivationMeter(trainer.actor)
    batches = [trainer.rollouts.sample([items[i] for i in trainer.sampler.next_step()[0]])
               for _ in range(args.rounds)]
    set_variant(cfg, "padded")
    exps = [trainer.rollouts.experience(s, trainer.kl_ctl.value) for s in batches]
    real = statistics.mean(float(e.attention_mask.sum() / e.attention_mask.numel()) for e in exps)

    def passes_round(r, name):
        set_variant(cfg, name)
        return timed(lambda: trainer.rollouts.experience(batches[r], trainer.kl_ctl.value), device)

    def update_round(r, name):
        set_variant(cfg, name)
        return metered(lambda: trainer.update(exps[r]), meter, device)
    names = list(VARIANTS)
    extra = {"real_token_fraction": round(real, 3), "answers": len(exps[0]), "micro_batch_size": 32}
    return (summarise("grpo_arithmetic/update", interleave(args.rounds, names, update_round), extra, device)
            + summarise("grpo_arithmetic/rollout_passes", interleave(args.rounds, names, passes_round), extra,
                        device))


def sft_default(args, device) -> List[Dict]:
    from fastrlhf.data import DataSpec
    from fastrlhf.rlhf import supervised
    from fastrlhf.rlhf.configs import SFTConfig
    from fastrlhf.rlhf.sft import train_sft
    from fastrlhf.tasks.default_task import PROFILES
    holder = {}
    real = supervised.SupervisedTrainer.run
    supervised.SupervisedTrainer.run = lambda self: holder.setdefault("t", self) and {}  # build, do not train
    try:
        train_sft(SFTConfig(**{**PROFILES["sft"], "output_dir": os.path.join(args.workdir, f"sft_out{os.getpid()}"),
                               "data": DataSpec(), "cpu_threads": args.threads, "resume": "no", "save_steps": 0,
                               "max_steps": 1000}))
    finally:
        supervised.SupervisedTrainer.run = real
    trainer = holder["t"]
    meter = ActivationMeter(trainer.engine)
    positions = []
    for _ in range(args.rounds):
        positions.append(trainer.sampler.state_dict())
        trainer.sampler.next_step()
    fractions = []
    for p in positions:
        trainer.sampler.load_state_dict(p)
        batch = trainer.collate([trainer.train_dataset[i] for i in trainer.sampler.next_step()[0]])
        fractions.append(float(batch["attention_mask"].sum() / batch["attention_mask"].numel()))

    def step_round(r, name):
        set_variant(trainer.cfg, name)
        trainer.sampler.load_state_dict(positions[r])
        return metered(trainer.train_step, meter, device)
    extra = {"real_token_fraction": round(statistics.mean(fractions), 3), "micro_batch_size": 32}
    return summarise("sft_default/step", interleave(args.rounds, list(VARIANTS), step_round), extra, device)


def grpo_ragged(args, device) -> List[Dict]:
    from fastrlhf.tasks.default_task import default_data_path
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.experience import Experience
    from fastrlhf.rlhf.ppo import PPOTrainer
    root = os.path.join(args.workdir, "ragged")
    if not os.path.isfile(os.path.join(root, "sft", "config.json")):
        tok = load_tokenizer(None, padding_side="left")
        load_causal_lm(None, seed=1).save_pretrained(f"{root}/sft")
        tok.save_pretrained(f"{root}/sft")
    tok = load_tokenizer(f"{root}/sft", padding_side="left")
    rows = [json.loads(line) for _, line in zip(range(64), open(default_data_path()))]
    items = [{"prompt": r["prompt"], "prompt_input_ids": list(tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False))}
        for r in rows]
    cfg = PPOConfig(model_name_or_path=f"{root}/sft", reward_fn=["fastrlhf.rewards:format_reward"], algo="grpo",
                    group_size=8, rollout_batch_size=8, micro_batch_size=32, kl_coef=0.0, max_new_tokens=200,
                    eval_prompts=0, seed=1, resume="no", save_steps=0, cpu_threads=args.threads, max_steps=1000,
                    output_dir=os.path.join(args.workdir, f"ragged_out{os.getpid()}"))
    trainer = PPOTrainer(cfg, prompts=items, eval_prompts=items[:1])
    meter = ActivationMeter(trainer.actor)
    g = torch.Generator().manual_seed(0)

    def synthetic(r):
        """64 answers (8 prompts x 8) of 5..200 random tokens after left-padded prompts."""
        prompts = [items[(8 * r + i // 8) % len(items)]["prompt_input_ids"] for i in range(64)]
        lengths = torch.randint(5, 201, (64,), generator=g).tolist()
        p, n = max(map(len, prompts)), max(lengths)
        seqs = torch.zeros(64, p + n, dtype=torch.long)
        att = torch.zeros_like(seqs)
        amask = torch.zeros(64, n)
        for i, (q, a) in enumerate(zip(prompts, lengths)):
            seqs[i, p - len(q):p], att[i, p - len(q):p] = torch.tensor(q), 1
            seqs[i, p:p + a], att[i, p:p + a], amask[i, :a] = torch.randint(4, 400, (a,), generator=g), 1, 1
        adv = torch.randn(64, 1, generator=g) * amask
        return Experience(sequences=seqs.to(device), attention_mask=att.to(device), action_mask=amask.to(device),
                          old_logprobs=None, ref_logprobs=None, advantages=adv.to(device),
                          scores=torch.zeros(64, device=device), prompt_len=p)
    exps = [synthetic(r) for r in range(args.rounds)]
    real = statistics.mean(float(e.attention_mask.sum() / e.attention_mask.numel()) for e in exps)

    def update_round(r, name):
        set_variant(cfg, name)
        return metered(lambda: trainer.update(exps[r]), meter, device)
    extra = {"real_token_fraction": round(real, 3), "answers": 64, "micro_batch_size": 32, "synthetic": True}
    return summarise("grpo_ragged/update", interleave(args.rounds, list(VARIANTS), update_round), extra, device)


WORKLOADS = {"grpo_arithmetic": grpo_arithmetic, "sft_default": sft_default, "grpo_ragged": grpo_ragged}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="models trained or saved here are reused by later runs")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per variant (interleaved)")
    p.add_argument("--sft_steps", type=int, default=150, help="SFT steps of the arithmetic actor")
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--gpu", action="store_true", help="run on the GPU (CUDA memory peaks instead of saved bytes)")
    p.add_argument("--device_label", default=None, help="the device column (default: what torch reports)")
    p.add_argument("--out", default=None, help="append the rows to this JSONL file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    if not args.gpu:
        torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    load = machine_load() if not args.gpu else {}
    info = device_info(device)
    if args.device_label:
        info["device"] = args.device_label
    rows = []
    for name in args.only.split(","):
        for row in WORKLOADS[name](args, device):
            rows.append({**info, **load, "threads": args.threads, **row})
    print(markdown_table(rows, ["workload", "variant", "median_cpu_s", "median_wall_s", "speedup_cpu_s",
                                "speedup_wall_s", "median_peak_mib", "real_token_fraction"]))
    if args.out:
        append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
