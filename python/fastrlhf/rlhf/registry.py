"""Every trainer the CLI runs, in one table: command -> (config class, train function, one-line
summary of its result, help). `fastrlhf <command>` and the steps of `fastrlhf train` dispatch
through it; adding a trainer is adding a row. A row with a `preset` is another name for a trainer
with some options set: every algorithm of `algorithms.ALGORITHMS` with a `command` (`fastrlhf grpo` =
`fastrlhf ppo --algo grpo --group_size 4`)."""
from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any, Callable, Dict, Optional

from .algorithms import ALGORITHMS, Algorithm
from .configs import DPOConfig, PPOConfig, RMConfig, SFTConfig
from .dpo import train_dpo
from .ppo import reward_text, train_ppo
from .reward_trainer import train_reward_model
from .sft import train_sft


@dataclass(frozen=True)
class TrainerEntry:
    config: type
    train: Callable[[Any], Dict[str, Any]]
    summary: Callable[[Dict[str, Any]], str]
    help: str
    preset: Dict[str, Any] = field(default_factory=dict)  # options set by the command (below file and flags)
    profile: Optional[str] = None  # the bundled-task profile it uses; unset = its own name


def _evaluated(label: str, summary: Callable[[Dict[str, Any]], str]) -> Callable[[Dict[str, Any]], str]:
    """`summary`, or a line without eval numbers when the run had no eval data."""
    return lambda r: summary(r) if r["eval_after"] else f"{label}: {r['steps']} steps (no eval data)"


def _ppo_summary(r: Dict[str, Any]) -> str:
    before, after = r["eval_before"], r["eval_after"]
    gt = f", ground truth {before['gt_score']:.3f} -> {after['gt_score']:.3f}" if "gt_score" in before else ""
    kl = f", KL to reference {after['kl_to_ref']:.3f}" if "kl_to_ref" in after else ""
    return (f"step 3 {r['trainer'].cfg.algo.upper()}: held-out reward {reward_text(before['reward'])} -> "
            f"{reward_text(after['reward'])}{gt}{kl}")


TRAINERS: Dict[str, TrainerEntry] = {
    "sft": TrainerEntry(SFTConfig, train_sft, _evaluated("step 1 SFT", lambda r: f"step 1 SFT: eval perplexity "
                        f"{r['eval_before']['perplexity']:.3f} -> {r['eval_after']['perplexity']:.3f}"),
                        "step 1: supervised fine-tuning"),
    "rm": TrainerEntry(RMConfig, train_reward_model, _evaluated("step 2 RM", lambda r: f"step 2 RM: eval accuracy "
                       f"{r['eval_before']['accuracy']:.3f} -> {r['eval_after']['accuracy']:.3f}"),
                       "step 2: reward model on preference pairs"),
    "ppo": TrainerEntry(PPOConfig, train_ppo, _evaluated("step 3", _ppo_summary),
                        "step 3: PPO (or --algo grpo, rloo, reinforce++...) on a reward model and/or reward "
                        "functions"),
    "dpo": TrainerEntry(DPOConfig, train_dpo, _evaluated("DPO", lambda r: f"DPO: held-out loss "
                        f"{r['eval_before']['loss']:.4f} -> {r['eval_after']['loss']:.4f}, reward accuracy "
                        f"{r['eval_after']['reward_accuracy']:.3f}"),
                        "DPO: preference pairs -> policy, instead of steps 2 + 3"),
}


def _algorithm_command(algo: Algorithm) -> TrainerEntry:
    """`fastrlhf <algo>` = `fastrlhf ppo --algo <algo>` with the algorithm's command options."""
    preset = {"algo": algo.name, **(algo.command or {})}
    flags = " ".join(f"--{k} {v}" for k, v in preset.items())
    critic = "" if algo.needs_critic else ", no critic"
    return TrainerEntry(PPOConfig, train_ppo, _evaluated("step 3", _ppo_summary),
                        f"step 3 with {algo.title}{critic} (= fastrlhf ppo {flags})", preset=preset, profile="ppo")


TRAINERS.update({a.name: _algorithm_command(a) for a in ALGORITHMS.values() if a.command is not None})
