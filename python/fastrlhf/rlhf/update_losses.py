"""The losses of one pass of step 3's update: the actor's (clipped policy loss, entropy bonus, GRPO's
KL loss), the critic's (clipped value loss) and PPO-ptx's SFT loss, each a function of a model and a
slice of the rollout batch, so that tests can hold packed and padded passes to the same numbers.

A mini-batch is one pass, or (`--packing` under a token budget) several: then every mean divides
by the whole mini-batch's totals (`rl_math.BatchTotals`), so the passes' losses and stats are
shares that add up to the mini-batch's, and so do their gradients.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import rl_math as M
from .experience import Experience, answer_logprobs, answer_values
from .sft import sequence_nll

Stats = Dict[str, float]


def actor_loss(cfg, actor, part: Experience, kl_coef: float, norm_len: int, totals: Optional[M.BatchTotals] = None,
               packed: bool = False) -> Tuple[torch.Tensor, Stats, torch.Tensor]:
    """(loss, stats, the actor's log-probs of the part's answers [b, N], detached). The ratio's
    denominator is `part.old_logprobs`, or (one optimizer step per rollout) this forward's own."""
    logp, entropy = answer_logprobs(actor, part.sequences, part.attention_mask, part.prompt_len,
                                    with_entropy=True, packed=packed, share_prompt=packed and cfg.sharing_prompts)
    old_logprobs = logp.detach() if part.old_logprobs is None else part.old_logprobs
    mask, agg = part.action_mask, dict(mode=cfg.loss_agg, norm_len=norm_len, totals=totals)
    low, high = cfg.clip_range()
    is_weights = None
    if cfg.tis_cap is not None and part.rollout_logprobs is not None:
        is_weights = M.truncated_is_weights(old_logprobs, part.rollout_logprobs, cfg.tis_cap)
    loss, st = M.clipped_policy_loss(logp, old_logprobs, part.advantages, mask, low,
                                     clip_eps_high=high, dual_clip=cfg.dual_clip,
                                     importance_level=cfg.importance_level, loss_agg=cfg.loss_agg,
                                     norm_len=norm_len, is_weights=is_weights, totals=totals)
    stats = {"policy_loss": loss.item(), **{k: v.item() for k, v in st.items()},
             "entropy": M.mean_over(entropy.detach(), mask, totals).item()}
    if is_weights is not None:
        stats["tis_weight"] = M.mean_over(is_weights, mask, totals).item()
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * M.aggregate_loss(entropy, mask, **agg)
    if not cfg.advantage_settings().kl_in_reward and kl_coef > 0:
        kl_loss = M.aggregate_loss(M.kl_estimate(logp, part.ref_logprobs, "k3"), mask, **agg)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.item()
    return loss, stats, logp.detach()


def critic_loss(cfg, critic, part: Experience, totals: Optional[M.BatchTotals] = None,
                packed: bool = False) -> Tuple[torch.Tensor, Stats]:
    """(value_loss_coef x the clipped value loss, stats)."""
    values = answer_values(critic, part.sequences, part.attention_mask, part.prompt_len, packed=packed,
                           share_prompt=packed and cfg.sharing_prompts)
    loss, st = M.clipped_value_loss(values, part.old_values, part.returns, part.action_mask, cfg.value_clip, totals)
    err = M.mean_over((values.detach() - part.returns) ** 2, part.action_mask, totals)
    stats = {"value_loss": loss.item(), "value_clipfrac": st["value_clipfrac"].item(), "value_error": err.item()}
    return cfg.value_loss_coef * loss, stats


def ptx_loss(cfg, actor, batch: Dict[str, torch.Tensor], labelled: int, packed: bool = False
             ) -> Tuple[torch.Tensor, Stats]:
    """(ptx_coef x this part's share of the SFT loss of a batch with `labelled` target tokens in all)."""
    total, _ = sequence_nll(actor, batch, packed=packed)
    ptx = total / max(labelled, 1)
    return cfg.ptx_coef * ptx, {"ptx_loss": ptx.item()}
