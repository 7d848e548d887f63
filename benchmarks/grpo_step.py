"""Seconds per GRPO step on the bundled tiny model (CPU), one process, one JSON line.

The configuration of a TRL-style GRPO run: 8 prompts x 4 answers, one epoch, one optimizer step
per rollout, answers up to 28 tokens, random-weight actor and reward model (seeds 1 and 2).
Used to measure the per-step work that `kl_coef 0` (no reference model) and the one-pass old
log-probs remove; compare two source trees by running it alternately with each on PYTHONPATH
(results: benchmarks/results/grpo_step_notes.md).

    python benchmarks/grpo_step.py --workdir /tmp/grpo_bench --steps 5 --kl_coef 0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="models and prompts are saved here on the first run")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--kl_coef", type=float, default=0.0)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.workdir, "items.json")):
        build(args.workdir)
    import fastrlhf
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import PPOTrainer
    with open(os.path.join(args.workdir, "items.json")) as f:
        items = json.load(f)
    root = args.workdir
    cfg = PPOConfig(model_name_or_path=f"{root}/sft", reward_model=f"{root}/rm", output_dir=f"{root}/out{os.getpid()}",
                    algo="grpo", group_size=4, rollout_batch_size=8, micro_batch_size=32, ppo_epochs=1,
                    kl_coef=args.kl_coef, max_new_tokens=28, learning_rate=3e-4, max_steps=args.steps + 1,
                    eval_prompts=0, seed=1, resume="no", cpu_threads=1, save_steps=0)
    trainer = PPOTrainer(cfg, prompts=items, eval_prompts=items[:1])
    times, cpu = [], []
    for i in range(args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    # CPU seconds of this (1-thread) process are the work done, much less disturbed than the wall
    # clock when other jobs share the cores
    print(json.dumps({"src": os.path.dirname(fastrlhf.__file__), "kl_coef": args.kl_coef,
                      "median_s": statistics.median(times), "median_cpu_s": statistics.median(cpu), "steps": times,
                      "ref_loaded": trainer.ref is not None,
                      "time_actor_forward": m.get("time_actor_forward"), "time_ref_forward": m.get("time_ref_forward"),
                      "load_avg_1m": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
