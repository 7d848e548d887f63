"""One GRPO step: fastrlhf vs TRL's GRPOTrainer (from PyPI, no vLLM), and TRL with
`fastrlhf.inject(model, generate=True)` (its generation on the hybrid engine).

Same policy (the bundled task's step-1 SFT model), reward model (its step-2 model, scoring the
answers: fastrlhf through --reward_model, TRL through a reward function calling the same model),
prompts and batch: 8 prompts x 4 answers, up to 24 new tokens, KL 0 (no reference model), one
optimizer step per rollout, --threads CPU threads (2, as the issue measured; 1 on a machine whose
cores are shared with other jobs, where multi-threaded regions spin on busy cores). fastrlhf runs
three times: with its defaults (step 3 packs: padding-free updates and scoring, each group's prompt
run once), with `--share_prompts false` (packed, each prompt run per answer) and with `--packing
false` (padded; TRL's GRPOTrainer has neither option, so TRL runs padded in every comparison;
before 2026-12-02 the defaults were padded, and `fastrlhf+packing` rows are `--packing` without
shared prompts). Each run is a fresh
process that makes one warm-up step and --steps timed steps; runs of the setups alternate
(fastrlhf, fastrlhf-noshare, fastrlhf-padded, trl, trl+inject, fastrlhf, ...) so a shared machine's load hits all
alike. Reported per setup: the median step time, split into generation and the rest, and the
ratios to plain TRL. One JSON row per setup is appended to benchmarks/results/peers.jsonl.

    pip install -e ".[peers]"          # trl
    python benchmarks/peers.py --workdir /tmp/fastrlhf_peers --rounds 5 --note "2-core VM, busy"
    python benchmarks/peers.py --gpu   # the same on a GPU (bf16 off: the tiny models are fp32)
    python benchmarks/peers.py --setups fastrlhf fastrlhf-padded trl   # some of them
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS, GROUP, NEW_TOKENS, LR = 8, 4, 24, 1e-5
SETUPS = ("fastrlhf", "fastrlhf-noshare", "fastrlhf-padded", "trl", "trl+inject")


# ------------------------------------------------------------------ models and prompts (once)
def prepare(workdir: str) -> None:
    """The bundled task's step-1 and step-2 models under workdir (trained once, each if missing)."""
    missing = [step for step, name in (("1", "step1_sft"), ("2", "step2_rm"))
               if not os.path.isfile(os.path.join(workdir, name, "config.json"))]
    if missing:
        subprocess.run([sys.executable, "-m", "fastrlhf.cli", "train", "--steps", *missing, "--output_dir", workdir,
                        "--resume", "no"], check=True)


def prompt_rows(n: int):
    from fastrlhf.tasks.default_task import default_data_path
    with open(default_data_path()) as f:
        return [json.loads(line)["prompt"] for _, line in zip(range(n), f)]


# ------------------------------------------------------------------ one setup in its own process
class StepClock:
    """Per-step wall times and the generation seconds inside each step."""

    def __init__(self):
        self.steps, self.gen, self._gen_now = [], [], 0.0

    def timed_generate(self, fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._gen_now += time.perf_counter() - t0
        return wrapped

    def step(self, fn):
        self._gen_now = 0.0
        t0 = time.perf_counter()
        fn()
        self.steps.append(time.perf_counter() - t0)
        self.gen.append(self._gen_now)


def run_fastrlhf(workdir: str, steps: int, device: str, threads: int, packing: bool = True,
                 share_prompts: bool = True) -> dict:
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import PPOTrainer
    tok = load_tokenizer(os.path.join(workdir, "step1_sft"), padding_side="left")
    items = [{"prompt": p, "prompt_input_ids": list(tok.apply_chat_template(
        [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))}
        for p in prompt_rows(PROMPTS * (steps + 1))]
    cfg = PPOConfig(model_name_or_path=os.path.join(workdir, "step1_sft"),
                    reward_model=os.path.join(workdir, "step2_rm"), output_dir=os.path.join(workdir, f"run{os.getpid()}"),
                    algo="grpo", group_size=GROUP, rollout_batch_size=PROMPTS, micro_batch_size=PROMPTS * GROUP,
                    ppo_epochs=1, kl_coef=0.0, max_new_tokens=NEW_TOKENS, learning_rate=LR, max_steps=steps + 1,
                    eval_prompts=0, seed=1, resume="no", cpu_threads=threads, save_steps=0,
                    packing=None if packing else False, share_prompts=None if share_prompts else False)
    trainer = PPOTrainer(cfg, prompts=items, eval_prompts=items[:1])
    clock = StepClock()
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        m = trainer.train_step()
        clock.steps.append(time.perf_counter() - t0)
        clock.gen.append(m["gen_time"])
    return {"steps": clock.steps[1:], "gen": clock.gen[1:]}


def run_trl(workdir: str, steps: int, device: str, inject: bool, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import fastrlhf
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.models.reward import RewardModel
    torch.set_num_threads(threads)
    sft = os.path.join(workdir, "step1_sft")
    tok = load_tokenizer(sft, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(sft)
    rm = RewardModel.from_pretrained(os.path.join(workdir, "step2_rm")).to(device).eval()

    def reward_model(prompts, completions, **_):
        """The step-2 model's score of prompt + answer (the same text fastrlhf's scorer sees)."""
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) + c[0]["content"]
                 if isinstance(c, list) else p + c for p, c in zip(prompts, completions)]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="right").to(device)
        with torch.no_grad():
            return rm.score(enc["input_ids"], enc["attention_mask"]).tolist()

    clock = StepClock()
    if inject:
        fastrlhf.inject(model, attention=False, norms=False, generate=True)
    model.generate = clock.timed_generate(model.generate)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock._gen_now, self.t0 = 0.0, time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock.steps.append(time.perf_counter() - self.t0)
            clock.gen.append(clock._gen_now)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompt_rows(PROMPTS * (steps + 1))])
    args = GRPOConfig(output_dir=os.path.join(workdir, f"trl{os.getpid()}"), per_device_train_batch_size=PROMPTS * GROUP,
                      num_generations=GROUP, max_completion_length=NEW_TOKENS, beta=0.0, num_iterations=1,
                      learning_rate=LR, max_steps=steps + 1, logging_steps=1000, save_strategy="no", report_to="none",
                      use_cpu=device == "cpu", gradient_checkpointing=False, shuffle_dataset=False, seed=1,
                      disable_tqdm=True, bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_model, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return {"steps": clock.steps[1:], "gen": clock.gen[1:]}


def child(args) -> None:
    if args.setup.startswith("fastrlhf"):
        out = run_fastrlhf(args.workdir, args.steps, args.device, args.threads,
                           packing=not args.setup.endswith("-padded"),
                           share_prompts=not args.setup.endswith("-noshare"))
    else:
        out = run_trl(args.workdir, args.steps, args.device, inject=args.setup == "trl+inject", threads=args.threads)
    print("@@" + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/fastrlhf_peers", help="the step-1/2 models are trained here once")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each setup, alternating")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run")
    ap.add_argument("--note", default="", help="recorded in every row (the machine and its load)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peers.jsonl"))
    ap.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS),
                    help="the setups to run (trl is always among them: the ratios are to it)")
    ap.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)  # one run, in a child process
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setup:
        child(args)
        return 0
    device = "cuda" if args.gpu else "cpu"
    prepare(args.workdir)
    setups = [s for s in SETUPS if s in args.setups or s == "trl"]
    runs = {s: {"steps": [], "gen": []} for s in setups}
    for r in range(args.rounds):
        for setup in setups:
            cmd = [sys.executable, os.path.abspath(__file__), "--setup", setup, "--workdir", args.workdir,
                   "--steps", str(args.steps), "--device", device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
            if proc.returncode or not lines:
                sys.exit(f"{setup} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            res = json.loads(lines[-1][2:])
            runs[setup]["steps"] += res["steps"]
            runs[setup]["gen"] += res["gen"]
            print(f"round {r + 1}/{args.rounds} {setup}: steps {[round(t, 3) for t in res['steps']]} "
                  f"generation {[round(t, 3) for t in res['gen']]}", flush=True)
    sys.path.insert(0, HERE)
    from common import append_jsonl, git_commit, machine_load, versions
    import torch
    import trl
    med = {s: statistics.median(v["steps"]) for s, v in runs.items()}
    gen = {s: statistics.median(v["gen"]) for s, v in runs.items()}
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    dev = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({args.threads} threads per run)"
    rows = []
    for s in setups:
        rows.append(dict(bench="grpo_step_peers", setup=s, prompts=PROMPTS, group_size=GROUP, new_tokens=NEW_TOKENS,
                         kl_coef=0.0, step_median_s=round(med[s], 4), generation_median_s=round(gen[s], 4),
                         rest_median_s=round(statistics.median([a - b for a, b in zip(runs[s]["steps"], runs[s]["gen"])]), 4),
                         speedup_vs_trl=round(med["trl"] / med[s], 3),
                         generation_speedup_vs_trl=round(gen["trl"] / gen[s], 3),
                         steps_timed=len(runs[s]["steps"]), all_steps_s=[round(t, 4) for t in runs[s]["steps"]],
                         trl=trl.__version__, trl_gradient_checkpointing=False, device=dev, note=args.note, date=date,
                         commit=git_commit(), **versions(), **machine_load(warn=device == "cpu")))
        print(f"{s:>12}: step {med[s]:.3f} s (generation {gen[s]:.3f} s), x{med['trl'] / med[s]:.2f} vs TRL")
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
