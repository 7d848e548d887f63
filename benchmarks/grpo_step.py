"""Seconds per GRPO step (CPU), one process, one JSON line; or two source trees compared.

--task default: the configuration of a TRL-style GRPO run on the bundled tiny model: 8 prompts x
4 answers, one epoch, one optimizer step per rollout, answers up to 28 tokens, random-weight actor
and reward model (seeds 1 and 2). --task arithmetic: `fastrlhf ppo --algo grpo` on the arithmetic
task as `fastrlhf train --task arithmetic` runs it (16 prompts x 8
answers, up to 12 new tokens, the exact-answer reward function in a worker process, kl_coef 0.1;
fastrlhf.tasks.arithmetic_task.PROFILES),
on its step-1 SFT model (trained once into --workdir).

--compare PYTHON [PYTHON ...] runs the measurement alternately under each interpreter (e.g. the
.venv of a checkout before a change and of one after), --rounds times, each run a fresh process,
and prints the medians and their ratios (rows appended to --out); results of earlier comparisons:
benchmarks/results/grpo_step_notes.md.

    python benchmarks/grpo_step.py --workdir /tmp/grpo_bench --steps 5 --kl_coef 0
    python benchmarks/grpo_step.py --task arithmetic --workdir /tmp/grpo_arith \
        --compare ../before/.venv/bin/python .venv/bin/python --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def build(root: str) -> None:
    """Save the actor, the reward model and 400 tokenized prompts of the bundled task under root."""
    from fastrlhf.tasks.default_task import default_data_path
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.models.reward import RewardModel
    tok = load_tokenizer(None, padding_side="left")
    load_causal_lm(None, seed=1).save_pretrained(f"{root}/sft")
    tok.save_pretrained(f"{root}/sft")
    RewardModel.from_pretrained(None, seed=2).save_pretrained(f"{root}/rm")
    tok.save_pretrained(f"{root}/rm")
    rows = [json.loads(line) for line in open(default_data_path())][:400]
    items = [{"prompt": r["prompt"],
              "prompt_input_ids": list(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                               add_generation_prompt=True, tokenize=True,
                                                               return_dict=False))} for r in rows]
    with open(f"{root}/items.json", "w") as f:
        json.dump(items, f)


def build_arithmetic(root: str) -> None:
    """The arithmetic task's step-1 SFT model under root/step1_sft (as `fastrlhf train` trains it)."""
    if not os.path.isfile(os.path.join(root, "step1_sft", "config.json")):
        subprocess.run([sys.executable, "-m", "fastrlhf.cli", "train", "--task", "arithmetic", "--steps", "1",
                        "--output_dir", root, "--resume", "no"], check=True)


def arithmetic_config(root: str, steps: int):
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.data import DataSpec
    from fastrlhf.tasks.arithmetic_task import PROFILES, shared_values
    from fastrlhf.tasks.evaluation import heldout_items
    prof = dict(PROFILES["ppo"])
    # the task's data spec, as `fastrlhf train --task arithmetic` passes it (without it the trainer
    # takes the prompts for the bundled default task's and its exact scorer refuses them)
    data = DataSpec(**shared_values()["data"])
    prof.update(model_name_or_path=f"{root}/step1_sft", output_dir=f"{root}/out{os.getpid()}", max_steps=steps + 1,
                eval_prompts=0, save_steps=0, seed=1, resume="no", data=data)
    items = heldout_items(load_tokenizer(f"{root}/step1_sft", padding_side="left"), data)
    return PPOConfig(**prof), items


def measure(args) -> dict:
    import fastrlhf
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import PPOTrainer
    root = args.workdir
    if args.task == "arithmetic":
        cfg, items = arithmetic_config(root, args.steps)
    else:
        with open(os.path.join(args.workdir, "items.json")) as f:
            items = json.load(f)
        cfg = PPOConfig(model_name_or_path=f"{root}/sft", reward_model=f"{root}/rm",
                        output_dir=f"{root}/out{os.getpid()}", algo="grpo", group_size=4, rollout_batch_size=8,
                        micro_batch_size=32, ppo_epochs=1, kl_coef=args.kl_coef, max_new_tokens=28,
                        learning_rate=3e-4, max_steps=args.steps + 1, eval_prompts=0, seed=1, resume="no",
                        cpu_threads=1, save_steps=0)
    trainer = PPOTrainer(cfg, prompts=items, eval_prompts=items[:1])
    times, cpu, gen = [], [], []
    for i in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            gen.append(m.get("gen_time"))
    # CPU seconds of this (1-thread) process are the work done, much less disturbed than the wall
    # clock when other jobs share the cores
    return {"src": os.path.dirname(fastrlhf.__file__), "task": args.task, "kl_coef": cfg.kl_coef,
            "median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu),
            "median_gen_s": statistics.median(gen) if None not in gen else None, "steps": times,
            "ref_loaded": getattr(trainer, "ref", None) is not None,
            "time_actor_forward": m.get("time_actor_forward"), "time_ref_forward": m.get("time_ref_forward"),
            "load_avg_1m": os.getloadavg()[0]}


def compare(args) -> None:
    """Alternate runs under each interpreter; medians, ratios to the first, rows to --out."""
    runs = {py: [] for py in args.compare}
    for r in range(args.rounds):
        for py in args.compare:
            cmd = [py, os.path.abspath(__file__), "--workdir", args.workdir, "--steps", str(args.steps),
                   "--kl_coef", str(args.kl_coef), "--task", args.task]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                sys.exit(f"{py} failed (rc {out.returncode}): {out.stderr[-4000:]}")
            runs[py].append(json.loads(lines[-1]))
            print(f"round {r + 1} {py}: {runs[py][-1]['median_s']:.3f} s/step", flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import append_jsonl, git_commit, machine_load, versions
    first = args.compare[0]
    med = {py: statistics.median(x["median_s"] for x in v) for py, v in runs.items()}
    cpu = {py: statistics.median(x["median_cpu_s"] for x in v) for py, v in runs.items()}
    rows = []
    for py, v in runs.items():
        gens = [x["median_gen_s"] for x in v if x["median_gen_s"] is not None]
        rows.append(dict(bench="grpo_step", task=args.task, src=v[0]["src"], python=py, rounds=args.rounds,
                         steps_per_run=args.steps, median_s=round(med[py], 4), median_cpu_s=round(cpu[py], 4),
                         median_gen_s=round(statistics.median(gens), 4) if gens else None,
                         speedup_vs_first=round(med[first] / med[py], 3),
                         cpu_speedup_vs_first=round(cpu[first] / cpu[py], 3),
                         run_medians_s=[round(x["median_s"], 4) for x in v], note=args.note,
                         date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), commit=git_commit(),
                         **versions(), **machine_load(warn=True)))
        print(f"{py}: {med[py]:.3f} s/step (cpu {cpu[py]:.3f} s), x{med[first] / med[py]:.2f} vs {first}")
    if args.out:
        append_jsonl(args.out, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="models and prompts are saved here on the first run")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--kl_coef", type=float, default=0.0, help="--task default only (arithmetic: its profile's)")
    p.add_argument("--task", choices=["default", "arithmetic"], default="default")
    p.add_argument("--compare", nargs="+", metavar="PYTHON", help="interpreters of the source trees to compare")
    p.add_argument("--rounds", type=int, default=5, help="--compare: runs of each interpreter, alternating")
    p.add_argument("--note", default="", help="--compare: recorded in every row (the machine and its load)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "grpo_step.jsonl"), help="--compare: rows appended here")
    args = p.parse_args(argv)
    if args.task == "arithmetic":
        build_arithmetic(args.workdir)
    elif not os.path.isfile(os.path.join(args.workdir, "items.json")):
        build(args.workdir)
    if args.compare:
        compare(args)
    else:
        print(json.dumps(measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
