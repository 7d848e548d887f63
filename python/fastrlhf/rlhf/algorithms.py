"""Step 3's RL algorithms, one record each. The config (`--algo` choices, defaults, checks), the
CLI commands (`fastrlhf grpo` = `fastrlhf ppo --algo grpo --group_size 4`), the models built
(`needs_critic`) and the advantages (`compute_advantages`) all read `ALGORITHMS`; adding an
algorithm is one record here plus its math in `rl_math` and its tests (docs/extending.md).

The algorithms share the rollout and the update loop (`ppo.PPOTrainer`) and differ only in what
a record says: whether a critic is trained, whether answers to the same prompt are compared
(`group_size >= 2`), whether advantages are whitened and the KL to the reference is a reward
penalty or a loss term by default, and the advantage function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import rl_math as M


@dataclass
class AdvantageSettings:
    """The knobs of `compute_advantages` (a view of PPOConfig, so the math is testable alone)."""
    algo: str = "ppo"                 # a key of ALGORITHMS
    kl_estimator: str = "k1"
    reward_clip: Optional[float] = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    group_size: int = 1
    kl_in_reward: bool = True          # False: the KL goes to the policy loss instead (GRPO)
    group_std_norm: bool = True        # grpo: divide by the group std (False: Dr.GRPO)


# (settings, scores [B], per-token KL [B, N] (0 when not in the reward), its coefficient,
#  action_mask [B, N], critic values [B, N] or None) -> (advantages [B, N], returns or None, stats)
AdvantageFn = Callable[[AdvantageSettings, torch.Tensor, torch.Tensor, float, torch.Tensor, Optional[torch.Tensor]],
                       Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, float]]]


@dataclass(frozen=True)
class Algorithm:
    name: str                          # the --algo value (and the command, when it has one)
    short: str                         # a few words for --algo's help
    title: str                         # the command's help: "step 3 with <title>, no critic"
    advantages: AdvantageFn
    needs_critic: bool = False         # a critic is trained and gives the values GAE needs
    grouped: bool = False              # compares the answers to one prompt: needs group_size >= 2
    whiten: bool = False               # default of --whiten_advantages
    kl_in_reward: bool = True          # default of --kl_in_reward (False: a k3 loss term instead)
    takes_group_std_norm: bool = False  # --group_std_norm means something for it
    # `fastrlhf <name>` runs `fastrlhf ppo --algo <name>` with these options (None: no command)
    command: Optional[Dict[str, Any]] = None


def _clipped(scores: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    return scores.clamp(-clip, clip) if clip else scores


def _gae(s, scores, kl, coef, mask, values):
    """ppo: per-token rewards = -kl_coef * KL, clipped score on the last answer token; GAE."""
    if values is None:
        raise ValueError("PPO needs critic values; use algo='grpo' or 'rloo' to train without a critic")
    rewards = M.token_rewards(scores, kl, mask, coef, s.reward_clip)
    adv, returns = M.gae(rewards, values, mask, s.gamma, s.lam)
    return adv, returns, {"return": M.masked_mean(returns, mask).item()}


def _reinforce(baseline: bool) -> AdvantageFn:
    """reinforce++: PPO's per-token rewards, discounted returns as advantages (Hu 2025);
    reinforce++_baseline first subtracts the group mean from the score."""
    def advantages(s, scores, kl, coef, mask, values):
        clipped = _clipped(scores, s.reward_clip)
        if baseline:
            clipped = M.group_advantages(clipped, s.group_size, "mean")
        adv = M.discounted_returns(M.token_rewards(clipped, kl, mask, coef), mask, s.gamma)
        return adv, None, {"return": M.masked_mean(adv, mask).item()}
    return advantages


def _group(kind: str) -> AdvantageFn:
    """grpo / rloo: sequence reward = clipped score - kl_coef * summed KL, compared within the
    group (`rl_math.group_advantages`), broadcast over the answer tokens."""
    def advantages(s, scores, kl, coef, mask, values):
        seq_reward = _clipped(scores, s.reward_clip) - coef * kl.sum(-1)
        seq_adv = M.group_advantages(seq_reward, s.group_size, kind, std_norm=s.group_std_norm)
        return seq_adv[:, None] * mask, None, {}
    return advantages


# group sizes of the commands: small enough for the bundled task on a CPU (the GRPO paper sampled
# 64, DAPO 16)
ALGORITHMS: Dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo", "critic + GAE", "PPO", _gae, needs_critic=True, whiten=True),
    Algorithm("grpo", "group-normalised", "GRPO (group-normalised advantages)", _group("grpo"), grouped=True,
              kl_in_reward=False, takes_group_std_norm=True, command={"group_size": 4}),
    Algorithm("rloo", "leave-one-out", "RLOO (leave-one-out baseline)", _group("rloo"), grouped=True,
              command={"group_size": 4}),
    Algorithm("reinforce++", "discounted returns, batch-whitened", "REINFORCE++ (batch-whitened returns)",
              _reinforce(baseline=False), whiten=True, command={}),
    Algorithm("reinforce++_baseline", "minus the group mean first", "REINFORCE++-baseline (group-mean baseline)",
              _reinforce(baseline=True), grouped=True, whiten=True, command={"group_size": 4}),
)}


def names(pred: Callable[[Algorithm], bool] = lambda a: True) -> Tuple[str, ...]:
    """The names of the algorithms `pred` holds for, in table order."""
    return tuple(a.name for a in ALGORITHMS.values() if pred(a))


def algo_help() -> str:
    """--algo's help: every algorithm with its few words."""
    parts = [f"{a.name} ({a.short})" for a in ALGORITHMS.values()]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def compute_advantages(s: AdvantageSettings, scores: torch.Tensor, action_mask: torch.Tensor,
                       logprobs: Optional[torch.Tensor], ref_logprobs: Optional[torch.Tensor],
                       values: Optional[torch.Tensor], kl_coef: float):
    """Shared by all algorithms -> (advantages [B, N], returns [B, N] or None, stats): the KL
    penalty (when it is in the reward), the algorithm's advantage function, then whitening.
    Critic-free sequence advantages are broadcast over the answer tokens. The KL penalty needs
    `logprobs` and `ref_logprobs` only when it is in the reward with kl_coef > 0."""
    if s.algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {s.algo!r}; choose one of {', '.join(ALGORITHMS)}")
    kl = None
    if s.kl_in_reward and kl_coef > 0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("a KL penalty in the reward needs the rollout's actor and reference log-probs")
        kl = M.kl_estimate(logprobs, ref_logprobs, s.kl_estimator) * action_mask
    coef = kl_coef if kl is not None else 0.0
    kl = torch.zeros_like(action_mask, dtype=torch.float32) if kl is None else kl
    adv, returns, stats = ALGORITHMS[s.algo].advantages(s, scores, kl, coef, action_mask, values)
    if s.whiten_advantages:
        adv = M.masked_whiten(adv, action_mask)
    return adv, returns, stats
