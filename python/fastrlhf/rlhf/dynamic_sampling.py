"""DAPO's dynamic sampling (`--dynamic_sampling`, Yu et al. 2025): a group whose answers all got
the same reward has zero group-relative advantage, so it teaches nothing and only dilutes the
batch. Such groups are dropped and the step samples the next batch of prompts, round after round,
until every process has `rollout_batch_size` groups with a signal, or `--max_sampling_rounds`
rounds were sampled; then the step trains on the first `rollout_batch_size` groups it kept, and
when it is short, fills the batch with dropped groups left out of the loss (every process keeps the
same shapes and number of optimizer steps).

The prompts come from the run's sampler, one rollout batch per round, so the data order is the
sampler's and a resumed run (whose sampler state was saved after the step's last round) consumes
the same prompts as the uninterrupted one. The filter reads the rewards the advantages see: all
sources summed, plus the soft overlong penalty, clipped by --reward_clip (not the KL penalty).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch

from ..utils.distributed import all_ranks_true
from . import rl_math as M
from .experience import ExperienceMaker, Rollout, ScoredRollout

DEFAULT_MAX_ROUNDS = 10  # veRL's DAPO recipe (max_num_gen_batches)


def learned_rewards(scored: ScoredRollout, reward_clip: float) -> torch.Tensor:
    """The rewards a group is compared on: sources + overlong penalty, clipped."""
    r = scored.scores if scored.penalty is None else scored.scores + scored.penalty
    return r.clamp(-reward_clip, reward_clip) if reward_clip else r


def sample_informative_groups(maker: ExperienceMaker, next_items: Callable[[], List[Dict[str, Any]]], cfg
                              ) -> Tuple[ScoredRollout, Dict[str, float]]:
    """Rounds of `maker.sample(next_items())` until every rank holds rollout_batch_size groups with
    a signal (or the round cap) -> (the step's groups, the step's sampling metrics)."""
    target, g = cfg.rollout_batch_size, cfg.group_size
    max_rounds = cfg.max_sampling_rounds or DEFAULT_MAX_ROUNDS
    rounds: List[ScoredRollout] = []
    kept: List[Tuple[int, int]] = []     # (round, group)
    dropped: List[Tuple[int, int]] = []
    while True:
        scored = maker.sample(next_items())
        signal = M.groups_with_signal(learned_rewards(scored, cfg.reward_clip), scored.sample_mask, g).tolist()
        kept += [(len(rounds), k) for k, s in enumerate(signal) if s]
        dropped += [(len(rounds), k) for k, s in enumerate(signal) if not s]
        rounds.append(scored)
        if all_ranks_true(len(kept) >= target) or len(rounds) >= max_rounds:
            break
    short = max(target - len(kept), 0)
    chosen = kept[:target] + dropped[:short]   # fillers: dropped groups, out of the loss
    parts = []
    for r, scored in enumerate(rounds):
        groups = [k for rr, k in chosen if rr == r]
        fill = [k for rr, k in dropped[:short] if rr == r]
        if groups:
            parts.append(select_groups(scored, groups, fill, g))
    valid = torch.cat([s.sample_mask for s in rounds]) > 0
    sampled = torch.cat([s.scores for s in rounds])[valid]
    stats = {"sampling_rounds": float(len(rounds)), "prompts_consumed": float(len(rounds) * target),
             "groups_dropped": float(len(dropped)), "groups_short": float(short),
             "sampled_reward_mean": sampled.mean().item() if len(sampled) else float("nan")}
    out = concat_scored(parts, maker.tokenizer.pad_token_id)
    out.times = {k: sum(s.times.get(k, 0.0) for s in rounds) for k in rounds[0].times}  # every round's time
    return out, stats


def select_groups(scored: ScoredRollout, groups: List[int], fillers: List[int], group_size: int) -> ScoredRollout:
    """The answers of `groups` (in order); those of `fillers` get sample_mask 0 (out of the loss)."""
    rows = torch.tensor([k * group_size + j for k in groups for j in range(group_size)], dtype=torch.long)
    mask = scored.sample_mask.clone()
    for k in fillers:
        mask[k * group_size:(k + 1) * group_size] = 0
    dev = scored.scores.device
    r = scored.rollout
    batch = {k: (v[rows.to(v.device)] if torch.is_tensor(v) else v) for k, v in scored.batch.items()}
    batch["prompt"] = [scored.batch["prompt"][i] for i in rows.tolist()]
    batch["columns"] = {k: [v[i] for i in rows.tolist()] for k, v in (scored.batch.get("columns") or {}).items()}
    rollout = Rollout(r.sequences[rows.to(dev)], r.attention_mask[rows.to(dev)], r.action_mask[rows.to(dev)],
                      r.prompt_len, None if r.engine_logprobs is None else r.engine_logprobs[rows.to(dev)],
                      None if r.turn_index is None else r.turn_index[rows.to(dev)],
                      None if r.trajectories is None else [r.trajectories[i] for i in rows.tolist()],
                      None if r.truncated is None else r.truncated[rows.to(dev)], dict(r.info))
    result = None
    if scored.result is not None:
        res = scored.result
        result = type(res)([res.total[i] for i in rows.tolist()],
                           {k: [v[i] for i in rows.tolist()] for k, v in res.per_source.items()})
    return ScoredRollout(batch, rollout, scored.scores[rows.to(dev)], mask[rows.to(dev)], result,
                         scored.truncated[rows.to(dev)],
                         None if scored.penalty is None else scored.penalty[rows.to(dev)], dict(scored.times))


def concat_scored(parts: List[ScoredRollout], pad_id: int) -> ScoredRollout:
    """Scored rollouts of several rounds as one: prompts re-padded on the left to the longest,
    answers on the right (times are the caller's to set)."""
    if len(parts) == 1:
        return parts[0]
    p_len = max(s.rollout.prompt_len for s in parts)
    n_len = max(s.rollout.sequences.shape[1] - s.rollout.prompt_len for s in parts)

    def split_pad(x: torch.Tensor, p: int, fill) -> torch.Tensor:
        prompt, answer = x[:, :p], x[:, p:]
        left = prompt.new_full((x.shape[0], p_len - p), fill)
        right = answer.new_full((x.shape[0], n_len - answer.shape[1]), fill)
        return torch.cat([left, prompt, answer, right], 1)

    def right_pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], n_len - x.shape[1])], 1)

    rollouts = [s.rollout for s in parts]
    rollout = Rollout(torch.cat([split_pad(r.sequences, r.prompt_len, pad_id) for r in rollouts]),
                      torch.cat([split_pad(r.attention_mask, r.prompt_len, 0) for r in rollouts]),
                      torch.cat([right_pad(r.action_mask) for r in rollouts]), p_len,
                      None if rollouts[0].engine_logprobs is None else
                      torch.cat([right_pad(r.engine_logprobs) for r in rollouts]),
                      None if rollouts[0].turn_index is None else torch.cat([right_pad(r.turn_index) for r in rollouts]),
                      None if rollouts[0].trajectories is None else [t for r in rollouts for t in r.trajectories],
                      None if rollouts[0].truncated is None else torch.cat([r.truncated for r in rollouts]),
                      dict(rollouts[-1].info))
    def left_pad(x: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([x.new_full((x.shape[0], p_len - x.shape[1]), fill), x], 1)

    batch = {"input_ids": torch.cat([left_pad(s.batch["input_ids"], pad_id) for s in parts]),
             "attention_mask": torch.cat([left_pad(s.batch["attention_mask"], 0) for s in parts]),
             "prompt": [p for s in parts for p in s.batch["prompt"]]}
    names = sorted({k for s in parts for k in (s.batch.get("columns") or {})})
    batch["columns"] = {k: [v for s in parts for v in (s.batch.get("columns") or {}).get(k, [None] * len(s.scores))]
                        for k in names}
    result = None
    if parts[0].result is not None:
        result = type(parts[0].result)([t for s in parts for t in s.result.total],
                                       {k: [v for s in parts for v in s.result.per_source[k]]
                                        for k in parts[0].result.per_source})
    return ScoredRollout(batch, rollout, torch.cat([s.scores for s in parts]),
                         torch.cat([s.sample_mask for s in parts]), result, torch.cat([s.truncated for s in parts]),
                         None if parts[0].penalty is None else torch.cat([s.penalty for s in parts]))
