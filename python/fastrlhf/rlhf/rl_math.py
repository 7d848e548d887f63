"""The math of RLHF as pure functions on tensors (no models, no state but the KL controllers).

Conventions: a batch of answers is laid out [B, N] (N = generated positions); `mask` is 1 on
real answer tokens (up to and including the EOS token) and 0 after. Every reduction is masked,
so padding never moves a number. Everything is computed in the input dtype; callers pass fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")
# how per-token losses become one number (see aggregate_loss)
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")


# --------------------------------------------------------------------------- masked statistics

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the positions where mask is 1; 0 (not NaN) when the mask is empty."""
    mask = mask.to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance); masked-out positions
    come back as 0. With shift_mean=False the mean is added back (used for rewards, whose
    sign carries meaning)."""
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- log-probs, entropy

def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels], computed in fp32: [..., V], [...] -> [...]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- answer masks

def answer_mask(answer_ids: torch.Tensor, eos_token_id: Optional[int]) -> torch.Tensor:
    """1 on each answer token up to and including the first EOS, 0 after it.

    Computed from EOS, not from the pad id, so it is right when pad == eos (GPT-2, Llama).
    An answer that is EOS alone keeps its one token: the reward has a place to land.
    """
    if eos_token_id is None:
        return torch.ones_like(answer_ids, dtype=torch.float32)
    is_eos = (answer_ids == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS strictly before this position
    return (eos_before == 0).float()


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 of each row of a [B, N] mask; -1 for an all-zero row."""
    n = mask.shape[-1]
    pos = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(dim=-1).values


# --------------------------------------------------------------------------- KL

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    k1 = log pi - log pi_ref (unbiased, can be negative); k2 = (k1)^2 / 2;
    k3 = exp(-k1) - 1 + k1 (unbiased for the expectation, always >= 0, low variance).
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  reward_clip: Optional[float] = None) -> torch.Tensor:
    """Per-token rewards [B, N]: -kl_coef * kl on every answer token, plus the (clipped)
    sequence score added on the last real answer token. Rows with no answer token get none."""
    if reward_clip is not None and reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    rewards = -kl_coef * kl * mask
    last = last_index(mask)
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller of Ziegler et al. (2019): moves the coefficient so the observed
    KL approaches `target`; the error is clipped to +-20% and scaled by n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, N] answers -> (advantages, returns).

    delta_t = r_t + gamma * V_{t'} - V_t, A_t = delta_t + gamma * lam * A_{t'}, where t' is the
    next position under the mask: masked positions are skipped, not terminal, so in a multi-turn
    trajectory the last generated token of a turn bootstraps from the value of the next turn's
    first generated token (environment tokens between them take no time step and get no
    advantage). After the last masked-in token the value is 0 (the episode ends); masked
    positions come back as 0.
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    n = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, here, torch.zeros_like(here))
        next_adv = torch.where(m, here, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t'} over [B, N] answers, t' the next masked-in position (masked
    positions are skipped, as in `gae`; 0 after the last one): the critic-free token advantage of
    REINFORCE++ (Hu 2025)."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t] > 0
        running = torch.where(m, rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(m, running, torch.zeros_like(running))
    return out


def group_advantages(scores: torch.Tensor, group_size: int, kind: str = "grpo",
                     eps: float = 1e-6, std_norm: bool = True) -> torch.Tensor:
    """Critic-free sequence advantages for scores [P * n] laid out prompt-major (the n samples
    of a prompt are adjacent).

    grpo: (s - group mean) / (group std + eps), std unbiased (a group of identical scores
          gives 0, not NaN); with std_norm=False s - group mean (Dr.GRPO, Liu et al. 2025:
          the std division favours prompts that are too easy or too hard);
    rloo: s_i - mean of the other n-1 samples = n / (n - 1) * (s_i - group mean);
    mean: s - group mean (the baseline of REINFORCE++-baseline).
    """
    if group_size < 2:
        raise ValueError(f"{kind} needs at least 2 samples per prompt (group_size), got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    g = scores.reshape(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    if kind == "grpo" and std_norm:
        out = (g - mean) / (g.std(dim=1, keepdim=True) + eps)
    elif kind in ("grpo", "mean"):
        out = g - mean
    elif kind == "rloo":
        out = (g - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown group advantage {kind!r}; choose 'grpo', 'rloo' or 'mean'")
    return out.reshape(-1)


def groups_with_signal(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G] bool for rewards [G * n] laid out prompt-major: True where the group's rewarded answers
    (valid = 1) do not all score the same. A group of equal rewards (or with fewer than two
    rewarded answers) has zero group-relative advantage everywhere, so no learning signal: DAPO's
    dynamic sampling (Yu et al. 2025) drops it and samples more prompts."""
    r, v = rewards.reshape(-1, group_size), valid.reshape(-1, group_size) > 0
    inf = torch.full_like(r, float("inf"))
    high = torch.where(v, r, -inf).max(1).values
    low = torch.where(v, r, inf).min(1).values
    return (v.sum(1) >= 2) & (high > low)


def truncated_answers(action_mask: torch.Tensor, answer_ids: torch.Tensor, eos_token_id: Optional[int],
                      max_new_tokens: int) -> torch.Tensor:
    """[B] bool: answers cut at the length limit, i.e. max_new_tokens tokens without an EOS among them."""
    full = action_mask.sum(-1) >= max_new_tokens
    if eos_token_id is None:
        return full
    return full & ~(answer_ids == eos_token_id).any(-1)


def overlong_penalty(answer_len: torch.Tensor, max_new_tokens: int, buffer_len: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) per answer: 0 up to
    max_new_tokens - buffer_len tokens, then falling linearly to -factor at the limit
    (-factor * (len - (max_new_tokens - buffer_len)) / buffer_len); answer_len counts the tokens
    under the answer mask (EOS included)."""
    over = (answer_len.to(torch.float32) - (max_new_tokens - buffer_len)).clamp(min=0.0)
    return -factor * over.clamp(max=float(buffer_len)) / buffer_len


class RunningMoments:
    """Running mean/std over all scores seen (Chan et al. parallel update), for reward
    normalisation; picklable state for resume."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta * delta * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s):
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]


# --------------------------------------------------------------------------- losses

@dataclass(frozen=True)
class BatchTotals:
    """The denominators of a mini-batch's means: its answer tokens and its answers with at least
    one token. A mini-batch run in several passes (packed rows under a token budget) divides
    each pass's sums by the whole mini-batch's totals, so the passes' losses and gradients add up
    to the mini-batch's exactly."""
    tokens: float
    answers: float

    @classmethod
    def of(cls, mask: torch.Tensor) -> "BatchTotals":
        return cls(float(mask.sum()), float((mask.sum(-1) > 0).sum()))


def mean_over(x: torch.Tensor, mask: torch.Tensor, totals: Optional[BatchTotals]) -> torch.Tensor:
    """masked_mean(x, mask), or, with `totals`, this part's share of the mini-batch's mean."""
    if totals is None:
        return masked_mean(x, mask)
    return masked_sum(x, mask.to(x.dtype)) / max(totals.tokens, 1.0)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
                   norm_len: Optional[float] = None, totals: Optional[BatchTotals] = None) -> torch.Tensor:
    """One number from per-token losses [B, N]:

    token_mean:              sum over every answer token / number of tokens (DAPO, Yu et al.
                             2025: each token weighs the same, long answers are not diluted);
    seq_mean_token_mean:     each answer's token mean, then the mean over answers (GRPO, Shao
                             et al. 2024);
    seq_mean_token_sum:      each answer's token sum, then the mean over answers;
    seq_mean_token_sum_norm: each answer's token sum / norm_len (a constant: the generation
                             budget), then the mean over answers (Dr.GRPO, Liu et al. 2025: no
                             per-answer length normalisation).
    Answers with no token under the mask are left out of the means over answers. With `totals`
    the means divide by the mini-batch's totals instead of this batch's (see BatchTotals)."""
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        return mean_over(per_token, mask, totals)
    seq = masked_sum(per_token, mask, -1)
    n_tokens = mask.sum(-1)
    if mode == "seq_mean_token_mean":
        seq = seq / n_tokens.clamp(min=1.0)
    elif mode == "seq_mean_token_sum_norm":
        if not norm_len or norm_len <= 0:
            raise ValueError("seq_mean_token_sum_norm divides by the generation budget: pass norm_len > 0")
        seq = seq / norm_len
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}")
    if totals is not None:
        return masked_sum(seq, (n_tokens > 0).to(per_token.dtype)) / max(totals.answers, 1.0)
    return masked_mean(seq, (n_tokens > 0).to(per_token.dtype))


def importance_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> torch.Tensor:
    """log(pi / pi_old) per token [B, N].

    token:    logp_t - old_t (PPO);
    sequence: the answer's length-normalised log-ratio mean_t(logp - old) on every token, with
              the gradient of logp_t (GSPO-token, Zheng et al. 2025): the value is the sequence
              ratio s_i, the gradient of token t is s_i * grad logp_t, so with
              seq_mean_token_mean it is GSPO's gradient."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"unknown importance level {level!r}; choose one of {IMPORTANCE_LEVELS}")
    seq = masked_mean(log_ratio.detach(), mask, -1).unsqueeze(-1)
    return logprobs - logprobs.detach() + seq


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, *,
                        clip_eps_high: Optional[float] = None, dual_clip: Optional[float] = None,
                        importance_level: str = "token", loss_agg: str = "token_mean",
                        norm_len: Optional[float] = None, is_weights: Optional[torch.Tensor] = None,
                        totals: Optional[BatchTotals] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO surrogate: per token max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old,
    aggregated by `loss_agg` (default: the mean over tokens).

    clip_eps is eps_low; clip_eps_high (unset = clip_eps) lets r rise further than it may fall
    (clip-higher, DAPO: 0.2 / 0.28). dual_clip c > 1 caps the loss of a negative-advantage token
    at -c A (Ye et al. 2020), so a huge ratio cannot blow the update up. importance_level
    'sequence' is GSPO's sequence ratio (importance_log_ratio). is_weights [B, N] (detached)
    multiply each token's loss: the truncated importance-sampling correction toward the
    rollout engine's policy (truncated_is_weights).

    Also returns the clip fraction (tokens where the clipped branch won), the dual-clip fraction
    when on, and the approximate KL between old and new policy per token (k3, >= 0). With
    `totals` the loss and the stats are this part's shares of a mini-batch's (they add up)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs, mask, importance_level))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    stats = {}
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        stats["policy_dualclip_frac"] = mean_over(capped.float(), mask, totals).detach()
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate_loss(per_token, mask, loss_agg, norm_len, totals=totals)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats["policy_clipfrac"] = mean_over((loss_clipped > loss_unclipped).float(), mask, totals)
        stats["approx_kl"] = mean_over(torch.expm1(-log_ratio) + log_ratio, mask, totals)
    return loss, stats


def truncated_is_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """min(pi_trainer / pi_rollout, C) per token, detached: truncated importance sampling (Yao et
    al. 2025) corrects the gradient for answers sampled by an engine whose numbers differ slightly
    from the trainer's."""
    return torch.exp(trainer_logprobs.detach() - rollout_logprobs).clamp(max=cap)


def logprob_mismatch(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs of the sampled tokens are from the trainer's: mean
    |delta| over answer tokens and KL(rollout || trainer) per token (k3 on tokens the engine
    sampled: unbiased, >= 0)."""
    with torch.no_grad():
        d = rollout_logprobs - trainer_logprobs
        return {"logprob_mismatch_abs": masked_mean(d.abs(), mask),
                "logprob_mismatch_kl": masked_mean(torch.expm1(-d) + d, mask)}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: Optional[float], totals: Optional[BatchTotals] = None
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = old +
    clamp(V - old, -clip, clip). clip None/<=0 gives the plain squared error. With `totals`, this
    part's shares of a mini-batch's loss and clip fraction."""
    err = (values - returns) ** 2
    if clip is not None and clip > 0:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns) ** 2
        loss = 0.5 * mean_over(torch.maximum(err, err_clipped), mask, totals)
        clipfrac = mean_over((err_clipped > err).float(), mask, totals)
    else:
        loss = 0.5 * mean_over(err, mask, totals)
        clipfrac = torch.zeros((), device=values.device)
    return loss, {"value_clipfrac": clipfrac.detach()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Direct preference optimisation (Rafailov et al. 2023) over summed sequence log-probs [B].

    loss = -(1-ls) log sigmoid(beta * h) - ls log sigmoid(-beta * h),
    h = (pi_c - ref_c) - (pi_r - ref_r). Implicit rewards beta * (pi - ref) are returned."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    with torch.no_grad():
        chosen_r = beta * (policy_chosen - ref_chosen)
        rejected_r = beta * (policy_rejected - ref_rejected)
        stats = {"chosen_reward": chosen_r.mean(), "rejected_reward": rejected_r.mean(),
                 "reward_accuracy": (chosen_r > rejected_r).float().mean(),
                 "reward_margin": (chosen_r - rejected_r).mean()}
    return losses.mean(), stats
