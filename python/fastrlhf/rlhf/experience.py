"""Rollout experience: what PPO, GRPO and RLOO learn from, and the model passes that fill it.

A batch is `sequences` [B, P + N] = left-padded prompts (P columns) then N generated columns.
Token t of the answer (column P + t) is predicted by the logits at column P + t - 1, so answer
log-probs and values live on the N answer columns: [B, N], masked by `action_mask`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from . import rl_math as M


@dataclass
class Experience:
    sequences: torch.Tensor        # [B, P + N] token ids
    attention_mask: torch.Tensor   # [B, P + N] 1 = real token (prompt left pad and after-EOS are 0)
    action_mask: torch.Tensor      # [B, N] float, 1 on answer tokens up to and including EOS
    old_logprobs: torch.Tensor     # [B, N] actor log-probs at rollout time
    ref_logprobs: torch.Tensor     # [B, N] reference-model log-probs
    advantages: torch.Tensor       # [B, N]
    scores: torch.Tensor           # [B] reward-model scores (raw, before clipping/normalising)
    prompt_len: int
    old_values: Optional[torch.Tensor] = None  # [B, N] critic values at rollout time (PPO only)
    returns: Optional[torch.Tensor] = None     # [B, N] value targets (PPO only)
    info: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows in `index` (a mini-batch), tensors indexed, the rest shared."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        return Experience(**out)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what HF generate uses), so the trainer's log-probs
    match the rollout's."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def answer_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    with_entropy: bool = False):
    """Log-probs [B, N] of the answer tokens under `model` (and their entropies when asked)."""
    logits = policy_logits(model, sequences, attention_mask)[:, prompt_len - 1:-1]
    logp = M.logprobs_from_logits(logits, sequences[:, prompt_len:])
    if with_entropy:
        return logp, M.entropy_from_logits(logits)
    return logp


def answer_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int) -> torch.Tensor:
    """Critic values [B, N]: the value of the state each answer token is chosen in (the
    column before it), the same alignment as the log-probs."""
    values = critic(input_ids=sequences, attention_mask=attention_mask)
    return values[:, prompt_len - 1:-1].float()


def sequence_scores(reward_model, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score [B] at the last real token of each sequence. Picked here from the
    per-token values, because a rollout is padded on both sides (left prompt padding, right
    after-EOS padding)."""
    values = reward_model(input_ids=sequences, attention_mask=attention_mask)
    last = M.last_index(attention_mask)
    return values[torch.arange(values.shape[0], device=values.device), last].float()


@dataclass
class AdvantageSettings:
    """The knobs of `compute_advantages` (a view of PPOConfig, so the math is testable alone)."""
    algo: str = "ppo"                 # ppo | grpo | rloo
    kl_estimator: str = "k1"
    reward_clip: Optional[float] = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    group_size: int = 1
    kl_in_reward: bool = True          # False: the KL goes to the policy loss instead (GRPO)


def compute_advantages(s: AdvantageSettings, scores: torch.Tensor, action_mask: torch.Tensor,
                       logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       values: Optional[torch.Tensor], kl_coef: float):
    """Shared by all three algorithms -> (advantages [B, N], returns [B, N] or None, stats).

    ppo:  per-token rewards = -kl_coef * KL, clipped score on the last answer token; GAE.
    rloo: sequence reward = clipped score - kl_coef * sum KL; leave-one-out baseline.
    grpo: group-normalised clipped score; KL (if any) is a loss term, not a reward.
    Critic-free advantages are broadcast over the answer tokens."""
    kl = M.kl_estimate(logprobs, ref_logprobs, s.kl_estimator) * action_mask
    seq_kl = kl.sum(-1)
    stats = {"kl": seq_kl.mean().item()}
    if s.algo == "ppo":
        if values is None:
            raise ValueError("PPO needs critic values; use algo='grpo' or 'rloo' to train without a critic")
        coef = kl_coef if s.kl_in_reward else 0.0
        rewards = M.token_rewards(scores, kl, action_mask, coef, s.reward_clip)
        adv, returns = M.gae(rewards, values, action_mask, s.gamma, s.lam)
        stats["return"] = M.masked_mean(returns, action_mask).item()
    else:
        clipped = scores.clamp(-s.reward_clip, s.reward_clip) if s.reward_clip else scores
        seq_reward = clipped - kl_coef * seq_kl if s.kl_in_reward else clipped
        seq_adv = M.group_advantages(seq_reward, s.group_size, s.algo)
        adv, returns = seq_adv[:, None] * action_mask, None
    if s.whiten_advantages:
        adv = M.masked_whiten(adv, action_mask)
    return adv, returns, stats
