"""End-to-end PPO iteration: the hybrid engine vs the same trainer with HF generate.

One run builds random-weight actor / reward models from configs, saves them, and times PPO
iterations of the real `PPOTrainer` twice: with the hybrid engine and with
`generation_fallback="hf"` (same models, prompts, batch, seed), iterations interleaved so a
shared machine's load hits both alike. Every answer is forced to the
full length (min_new_tokens = max_new_tokens) so both do the same work. Reported per mode:
the median time split of an iteration (generation; actor / reference / reward / critic
forwards; actor and critic training), sequences/s and generated tokens/s, and the end-to-end
speedup. One JSON row per mode is appended to benchmarks/results/rlhf.jsonl (or --out).

    python benchmarks/rlhf.py                 # CPU: the bundled tiny Llama (actor and reward)
    python benchmarks/rlhf.py --gpu           # OPT-1.3B actor + OPT-350M reward, 256 + 256, bf16
    python benchmarks/rlhf.py --preset opt-125m --batch 8 --prompt_len 64 --answer_len 64
    python benchmarks/rlhf.py --preset tiny-grpo   # GRPO, group 4, a reward function (worker process),
                                                   # no reward model and no critic
    python benchmarks/rlhf.py --preset tiny --algo grpo --reward_fn my_rewards.py:score
    python benchmarks/rlhf.py --preset tiny-agent  # multi-turn GRPO (an environment in a worker process):
                                                   # the engine's session vs generating each turn anew

Multi-turn presets (-agent) run `benchmarks/bench_env.py:FixedTurns` as --env: 3 model turns of
answer_len tokens, each answered by a 16-token observation (a stand-in for a tool's answer). Their
modes are "session" (the continuation API: only new tokens are computed) and "turn_by_turn" (every
turn generated anew on the whole conversation so far, as an agent loop over a generate() call
does), and the split is generation / environment (waiting for it with nothing to decode) /
training (time_generation, time_environment, time_actor_train + time_critic_train).

With --reward_fn (or a -grpo preset) the reward is that function, run in a worker process like
in training (its time is in time_reward_forward); no reward model is built.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile

import torch

from common import git_commit, machine_load, versions

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rlhf.jsonl")

OPT_1_3B = dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)
OPT_350M = dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                word_embed_proj_dim=512, vocab_size=50272, max_position_embeddings=2048,
                do_layer_norm_before=False)
OPT_125M = dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048)
# name -> (actor config or None = bundled default, reward config or None, batch, prompt, answer, dtype)
PRESETS = {
    "tiny": (None, None, 8, 16, 16, "fp32"),
    "tiny-grpo": (None, None, 8, 16, 16, "fp32"),
    "opt-125m": (OPT_125M, OPT_125M, 8, 64, 64, "fp32"),
    "opt-1.3b": (OPT_1_3B, OPT_350M, 16, 256, 256, "bf16"),
    "tiny-agent": (None, None, 8, 16, 16, "fp32"),
    "opt-1.3b-agent": (OPT_1_3B, OPT_350M, 16, 256, 64, "bf16"),
}
# presets that train GRPO on a reward function: (algo, group size, reward function)
GRPO_PRESETS = {"tiny-grpo": ("grpo", 4, "fastrlhf.rewards:length_penalty"),
                "tiny-agent": ("grpo", 4, None), "opt-1.3b-agent": ("grpo", 4, None)}
AGENT_ENV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_env.py") + ":FixedTurns"
AGENT_SPLIT = ("time_generation", "time_environment", "time_train")
SPLIT = ("gen_time", "time_actor_forward", "time_ref_forward", "time_reward_forward", "time_critic_forward",
         "time_actor_train", "time_critic_train")


def build_models(root: str, actor_cfg, reward_cfg, seed: int):
    """Save actor and reward model (random weights) + a tokenizer into root; returns (actor, rm) dirs."""
    from transformers import OPTConfig
    from fastrlhf.models.loading import build_from_config, load_causal_lm, load_tokenizer
    from fastrlhf.models.reward import RewardModel
    from transformers import AutoModel, AutoModelForCausalLM
    tok = load_tokenizer(None)  # only its pad / eos ids matter: prompts are random ids
    paths = []
    for name, cfg, cls in (("actor", actor_cfg, None), ("reward", reward_cfg, "rm")):
        d = os.path.join(root, name)
        if cfg is None:
            model = load_causal_lm(None, seed=seed) if cls is None else RewardModel.from_pretrained(None, seed=seed)
        else:
            conf = OPTConfig(**cfg, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id)
            conf.save_pretrained(d)
            if cls is None:
                model = build_from_config(AutoModelForCausalLM, d, torch.float32, seed)
            else:
                model = RewardModel(build_from_config(AutoModel, d, torch.float32, seed))
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths.append(d)
        del model
    return tuple(paths), tok


def random_prompts(tok, n: int, length: int, vocab: int, seed: int):
    """Prompts of random ordinary tokens (no specials), lengths between 3/4 and all of `length`,
    so the batch is left-padded like real data."""
    g = torch.Generator().manual_seed(seed)
    low = max(tok.all_special_ids) + 1
    items = []
    for _ in range(n):
        k = int(torch.randint(max(1, 3 * length // 4), length + 1, (1,), generator=g))
        items.append({"prompt": "", "prompt_input_ids": torch.randint(low, vocab, (k,), generator=g)})
    return items


def make_trainer(mode: str, paths, prompts, args, dtype: str):
    from fastrlhf.data import DataSpec
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import PPOTrainer
    actor_dir, rm_dir = paths
    agent = args.preset.endswith("-agent")
    rewards = dict(reward_fn=[args.reward_fn]) if args.reward_fn else dict(reward_model=rm_dir)
    if agent:   # the environment's reward; its turns and observations (benchmarks/bench_env.py)
        rewards = dict(env=AGENT_ENV, max_turns=3, max_observation_tokens=32)
    group = args.group_size if args.algo != "ppo" else 1
    if args.batch % group:
        raise SystemExit(f"--batch {args.batch} (answers per iteration) must be a multiple of --group_size {group}")
    cfg = PPOConfig(model_name_or_path=actor_dir, output_dir=os.path.join(args.workdir, mode), **rewards,
                    algo=args.algo, group_size=group, rollout_batch_size=args.batch // group,
                    micro_batch_size=args.micro_batch or args.batch,
                    max_new_tokens=args.answer_len, min_new_tokens=args.answer_len, dtype=dtype,
                    zero_stage=args.zero_stage, max_steps=args.warmup + args.iters, eval_prompts=0, seed=1,
                    generation_fallback="hf" if mode == "hf" else None, resume="no", kl_coef=0.0 if agent else 0.05,
                    data=DataSpec(max_prompt_len=args.prompt_len, max_answer_len=args.answer_len))
    trainer = PPOTrainer(cfg, prompts=prompts, eval_prompts=prompts[:1])
    trainer.rollouts.gt_score = None  # random prompts: there is no ground truth to score
    if agent:
        trainer.rollouts.agents.driver.turn_by_turn = mode == "turn_by_turn"
    return trainer


def summarize(rows, args):
    for r in rows:
        r["time_train"] = r.get("time_actor_train", 0.0) + r.get("time_critic_train", 0.0)
    keys = SPLIT + AGENT_SPLIT + ("step_time", "turns_mean", "trajectory_tokens")
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    med["seqs_per_s"] = args.batch / med["step_time"]
    turns = med["turns_mean"] or 1.0   # multi-turn: every turn is answer_len tokens (forced)
    med["gen_tokens_per_s"] = args.batch * args.answer_len * turns / med["gen_time"]
    return med


def run_modes(paths, prompts, args, dtype: str):
    """Interleaved (engine, hf, engine, hf, ...) so load from other jobs hits both alike;
    --sequential builds one trainer at a time (half the memory, for big models)."""
    rows = {m: [] for m in args.modes}
    groups = [args.modes] if not args.sequential else [[m] for m in args.modes]
    for group in groups:
        trainers = {m: make_trainer(m, paths, prompts, args, dtype) for m in group}
        for i in range(args.warmup + args.iters):
            for m in group:
                r = trainers[m].train_step()
                if i >= args.warmup:
                    rows[m].append(r)
        del trainers
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {m: summarize(rows[m], args) for m in args.modes}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--gpu", action="store_true", help="shorthand for --preset opt-1.3b")
    p.add_argument("--batch", type=int, default=None, help="prompts per iteration")
    p.add_argument("--micro_batch", type=int, default=None, help="update mini-batch (default: the batch)")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--answer_len", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--zero_stage", type=int, default=0)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--modes", nargs="+", default=None, choices=("engine", "hf", "session", "turn_by_turn"),
                   help="default: engine hf; for -agent presets session turn_by_turn")
    p.add_argument("--algo", choices=("ppo", "grpo", "rloo"), default=None, help="default: ppo (grpo for -grpo presets)")
    p.add_argument("--group_size", type=int, default=None, help="answers per prompt for grpo/rloo (default 4)")
    p.add_argument("--reward_fn", default=None, help="reward function SPEC instead of a reward model (default for "
                   "-grpo presets: fastrlhf.rewards:length_penalty)")
    p.add_argument("--sequential", action="store_true", help="one trainer at a time instead of interleaved")
    p.add_argument("--out", default=RESULTS, help="JSONL file the rows are appended to")
    p.add_argument("--no_save", action="store_true", help="do not append to the results file")
    p.add_argument("--machine", default=None, help="a note on the machine kept in each row (e.g. '2-core CPU VM, "
                   "shared/busy')")
    args = p.parse_args(argv)
    if args.gpu:
        args.preset = "opt-1.3b"
    actor_cfg, reward_cfg, batch, plen, alen, dtype = PRESETS[args.preset]
    algo, group, fn = GRPO_PRESETS.get(args.preset, ("ppo", 4, None))
    args.algo, args.group_size = args.algo or algo, args.group_size or group
    args.reward_fn = args.reward_fn or fn
    agent = args.preset.endswith("-agent")
    args.modes = args.modes or (["session", "turn_by_turn"] if agent else ["engine", "hf"])
    if agent and set(args.modes) - {"session", "turn_by_turn"} or not agent and set(args.modes) - {"engine", "hf"}:
        raise SystemExit(f"--modes {' '.join(args.modes)}: -agent presets compare session and turn_by_turn, the "
                         "others engine and hf")
    if args.gpu and args.sequential is False and torch.cuda.is_available():
        args.sequential = True  # two full PPO setups of OPT-1.3B do not both fit comfortably
    args.batch, args.prompt_len = args.batch or batch, args.prompt_len or plen
    args.answer_len, dtype = args.answer_len or alen, args.dtype or dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("FASTRLHF_NO_PROGRESS", "1")
    load = machine_load(warn=not torch.cuda.is_available())
    with tempfile.TemporaryDirectory() as root:
        args.workdir = root
        paths, tok = build_models(root, actor_cfg, reward_cfg, seed=0)
        vocab = actor_cfg["vocab_size"] if actor_cfg else len(tok)
        prompts = random_prompts(tok, args.batch * (args.warmup + args.iters), args.prompt_len, vocab, seed=0)
        results = run_modes(paths, prompts, args, dtype)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    dev = device_name()
    reward = f"reward function {args.reward_fn}" if args.reward_fn else "reward model"
    if agent:
        reward = f"the environment's reward ({AGENT_ENV.rsplit('/', 1)[-1]}, 3 turns)"
    print(f"\n{args.algo.upper()} iteration, preset {args.preset}: batch {args.batch} answers, prompt {args.prompt_len} + "
          f"answer {args.answer_len} tokens, {dtype}, ZeRO-{args.zero_stage}, {reward}, device {dev}, {when}")
    print(f"{'seconds (median)':<22}" + "".join(f"{m:>14}" for m in results))
    for k in (AGENT_SPLIT if agent else ()) + SPLIT + ("step_time",):
        print(f"{k:<22}" + "".join(f"{results[m][k]:>14.4f}" for m in results))
    for k in ("seqs_per_s", "gen_tokens_per_s") + (("turns_mean", "trajectory_tokens") if agent else ()):
        print(f"{k:<22}" + "".join(f"{results[m][k]:>14.2f}" for m in results))
    speedup = None
    if "engine" in results and "hf" in results:
        speedup = results["hf"]["step_time"] / results["engine"]["step_time"]
        gen_speedup = results["hf"]["gen_time"] / results["engine"]["gen_time"]
        print(f"engine vs hf: end to end {speedup:.2f}x, generation {gen_speedup:.2f}x")
    if "session" in results and "turn_by_turn" in results:
        speedup = results["turn_by_turn"]["step_time"] / results["session"]["step_time"]
        gen_speedup = results["turn_by_turn"]["time_generation"] / results["session"]["time_generation"]
        print(f"session vs turn by turn: end to end {speedup:.2f}x, generation {gen_speedup:.2f}x")
    if not args.no_save:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for mode, r in results.items():
                extra = {"algo": args.algo, "group_size": args.group_size,
                         "reward_fn": args.reward_fn} if args.reward_fn or args.algo != "ppo" else {}
                f.write(json.dumps({"bench": "rlhf_ppo_iteration", "date": when, "device": dev, "preset": args.preset,
                                    "mode": mode, **extra, "batch": args.batch, "prompt_len": args.prompt_len,
                                    "answer_len": args.answer_len, "dtype": dtype, "zero_stage": args.zero_stage,
                                    "iters": args.iters, "commit": git_commit(), **versions(),
                                    "interleaved": not args.sequential, **load,
                                    **({"machine": args.machine} if args.machine else {}),
                                    "speedup_vs_hf": speedup if mode == "engine" else None,
                                    **({"env": AGENT_ENV.rsplit("/", 1)[-1], "turns": 3,
                                        "speedup_vs_turn_by_turn": speedup if mode == "session" else None}
                                       if agent else {}),
                                    **{k: round(v, 6) for k, v in r.items()}}) + "\n")
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
