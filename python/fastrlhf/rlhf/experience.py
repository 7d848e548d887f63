"""Rollouts: answers sampled to a batch of prompts (`Rollout`), what PPO and the critic-free
algorithms learn from (`Experience`), the model passes that fill it, and `ExperienceMaker`, which
samples answers with the hybrid engine on the actor's own weights (keeping the engine's
log-probs, to log how far they are from the trainer's), scores them and turns them into an
Experience (the advantages come from `algorithms.compute_advantages`).

A batch is `sequences` [B, P + N] = left-padded prompts (P columns) then N generated columns.
Token t of the answer (column P + t) is predicted by the logits at column P + t - 1, so answer
log-probs and values live on the N answer columns: [B, N], masked by `action_mask`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ..utils.distributed import all_gather_cat
from ..utils.positions import position_ids_from_mask
from . import rl_math as M
from .algorithms import compute_advantages
from .batches import to_device
from .logprobs import shifted_logprobs
from .packing import plan_passes


@dataclass
class Rollout:
    """Answers sampled to a PromptCollator batch."""
    sequences: torch.Tensor        # [B, P + N] the left-padded prompts, then the generated columns
    attention_mask: torch.Tensor   # [B, P + N] long: the prompt mask, then action_mask
    action_mask: torch.Tensor      # [B, N] float: 1 on answer tokens up to and including EOS
    prompt_len: int                # P
    engine_logprobs: Optional[torch.Tensor] = None  # [B, N] the generation engine's log-probs, when asked
    # multi-turn rollouts (fastrlhf.agents): the answer columns hold the model's and the environment's
    # turns; attention_mask covers both, action_mask only the model's tokens
    turn_index: Optional[torch.Tensor] = None   # [B, N] long: model turn (from 1) of each generated token, 0 else
    trajectories: Optional[List[Any]] = None    # the agents.trajectory.Trajectory records, in row order
    truncated: Optional[torch.Tensor] = None    # [B] bool: trajectories cut by a length limit
    info: Dict[str, float] = field(default_factory=dict)  # the rollout's own metrics (turns, tool calls, ...)


@dataclass
class ScoredRollout:
    """A Rollout with its rewards, before any model pass: what dynamic sampling keeps or drops."""
    batch: Dict[str, Any]          # the PromptCollator batch it answers (prompts repeated group_size times)
    rollout: Rollout
    scores: torch.Tensor           # [B] all reward sources summed; a rewardless sample: its group's mean
    sample_mask: torch.Tensor      # [B] 1 = every source rewarded the sample
    result: Any                    # the sources' RewardResult; None when the reward model is the only one
    truncated: torch.Tensor        # [B] bool: cut at max_new_tokens without an EOS
    penalty: Optional[torch.Tensor] = None  # [B] the soft overlong penalty, added to the scores
    times: Dict[str, float] = field(default_factory=dict)  # gen_time, time_reward_forward


def reward_stats(result) -> Dict[str, float]:
    """Per-source reward metrics of a RewardResult (None: the reward model alone, nothing to add)."""
    return result.stats() if result is not None else {"rewardless_samples": 0.0}


@dataclass
class Experience:
    sequences: torch.Tensor        # [B, P + N] token ids
    attention_mask: torch.Tensor   # [B, P + N] 1 = real token (prompt left pad and after-EOS are 0)
    action_mask: torch.Tensor      # [B, N] float, 1 on answer tokens up to and including EOS, times sample_mask
    old_logprobs: Optional[torch.Tensor]  # [B, N] actor log-probs at rollout time; None: the update's
                                          # own forward gives them (one optimizer step per rollout)
    ref_logprobs: Optional[torch.Tensor]  # [B, N] reference-model log-probs; None without a reference
    advantages: torch.Tensor       # [B, N]
    scores: torch.Tensor           # [B] total rewards (raw, before clipping/normalising); see sample_mask
    prompt_len: int
    old_values: Optional[torch.Tensor] = None  # [B, N] critic values at rollout time (PPO only)
    returns: Optional[torch.Tensor] = None     # [B, N] value targets (PPO only)
    rollout_logprobs: Optional[torch.Tensor] = None  # [B, N] the generation engine's log-probs
    # [B] 1 = the sample has a reward; 0 = a reward source gave None: the row's score is a stand-in
    # (its group's mean), and the row is out of the loss (already multiplied into action_mask)
    sample_mask: Optional[torch.Tensor] = None
    turn_index: Optional[torch.Tensor] = None  # [B, N] multi-turn: model turn of each generated token (Rollout's)
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


def repeat_rows(batch: Any, g: int) -> Any:
    """A collated batch with each row repeated g times, the copies adjacent (rows b*g .. b*g+g-1
    are row b): tensors along dim 0, lists element by element, dicts (the "columns") per value.
    The same as collating every item g times, without padding the prompts again."""
    if g == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.repeat_interleave(g, dim=0)
    if isinstance(batch, dict):
        return {k: repeat_rows(v, g) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [x for x in batch for _ in range(g)]
    return batch


def answer_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    with_entropy: bool = False, packed: bool = False, share_prompt: bool = False):
    """Log-probs [B, N] of the answer tokens under `model` (and their entropies when asked), from
    the fused op on the answer columns only (`logprobs.shifted_logprobs`); packed=True runs the
    real tokens packed into one row (0 after each answer's end), and with share_prompt each group's
    prompt (rows with the same prompt columns) once."""
    return shifted_logprobs(model, sequences, attention_mask, position_ids=position_ids_from_mask(attention_mask),
                            start=prompt_len - 1, with_entropy=with_entropy, packed=packed,
                            shared_prefix=prompt_len if share_prompt else 0)


def answer_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_len: int, packed: bool = False, share_prompt: bool = False) -> torch.Tensor:
    """Critic values [B, N]: the value of the state each answer token is chosen in (the
    column before it), the same alignment as the log-probs."""
    values = critic(sequences, attention_mask, **_packed_kwargs(packed, share_prompt, prompt_len))
    return values[:, prompt_len - 1:-1].float()


def _packed_kwargs(packed: bool, share_prompt: bool, prompt_len: int) -> Dict[str, Any]:
    if not packed:
        return {}
    return {"packed": True, "shared_prefix": prompt_len if share_prompt else 0}


def sequence_scores(reward_model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    packed: bool = False, share_prompt: bool = False, prompt_len: int = 0) -> torch.Tensor:
    """Reward-model score [B] at the last real token of each sequence. Picked here from the
    per-token values, because a rollout is padded on both sides (left prompt padding, right
    after-EOS padding). share_prompt (packed): rows with the same first prompt_len columns run them once."""
    values = reward_model(sequences, attention_mask, **_packed_kwargs(packed, share_prompt, prompt_len))
    last = M.last_index(attention_mask)
    return values[torch.arange(values.shape[0], device=values.device), last].float()


def rollout_stats(exp: "Experience", old_logprobs: Optional[torch.Tensor], kl_estimator: str,
                  rows: Optional[torch.Tensor] = None, max_turns: int = 0) -> Dict[str, float]:
    """What a step logs about its rollouts once the trainer's log-probs at rollout time are known
    (`exp.old_logprobs`, or the update's when its own forward gave them; None: not known, nothing
    to log): the summed KL to the reference per answer, and the rollout engine's mismatch to the
    trainer's log-probs. `rows` [B] bool: only these rows' log-probs are known (the update's
    forwards before its first optimizer step, with --old_logprobs engine). Multi-turn rollouts
    (`max_turns` > 0) add the mismatch of each model turn k (`logprob_mismatch_abs_turn<k>`; 0 for a
    turn no trajectory reached), the same keys on every rank."""
    out = {}
    if old_logprobs is None or (rows is not None and not bool(rows.any())):
        return out
    if rows is not None:
        index = rows.nonzero().squeeze(1)
        exp, old_logprobs = exp.select(index), old_logprobs[index]
    mask = exp.action_mask
    if exp.ref_logprobs is not None:
        out["kl"] = (M.kl_estimate(old_logprobs, exp.ref_logprobs, kl_estimator) * mask).sum(-1).mean().item()
    if exp.rollout_logprobs is not None:
        out.update({k: v.item() for k, v in M.logprob_mismatch(old_logprobs, exp.rollout_logprobs, mask).items()})
        if exp.turn_index is not None:
            for turn in range(1, max_turns + 1):
                in_turn = mask * (exp.turn_index == turn).to(mask.dtype)
                out[f"logprob_mismatch_abs_turn{turn}"] = M.logprob_mismatch(
                    old_logprobs, exp.rollout_logprobs, in_turn)["logprob_mismatch_abs"].item()
    return out


def stopwatch(device: torch.device) -> Callable[[], float]:
    """A lap timer: each call returns the seconds since the previous one (device work finished
    first, so GPU times are real)."""
    last = [time.perf_counter()]

    def lap() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        dt, last[0] = now - last[0], now
        return dt
    return lap


class ExperienceMaker:
    """Sample answers to a batch of prompts, score them and compute what the update needs.

    `models` is a `ppo_models.PPOModels`; `gt_score(prompt, answer)`, when given, is an exact
    scorer of the task (the bundled one has one) logged beside the learned reward."""

    def __init__(self, cfg, models, tokenizer, device: torch.device, rank: int, max_new_tokens: int,
                 gt_score: Optional[Callable[[str, str], float]] = None):
        from ..data.collators import PromptCollator
        from ..hybrid_engine import EngineConfig, HybridEngine
        self.cfg, self.models, self.tokenizer, self.device = cfg, models, tokenizer, device
        self.max_new_tokens, self.gt_score = max_new_tokens, gt_score
        self.collate = PromptCollator(tokenizer.pad_token_id)
        # the bare module: the engine finds ZeRO-3 partitions on its parameters either way, and a
        # DeepSpeedEngine's own `.config` (its JSON) would shadow the HF config it looks for
        self.engine = HybridEngine(models.actor.module, tokenizer, EngineConfig(
            fallback=cfg.generation_fallback, tp_size=cfg.inference_tp_size))
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
        self.reward_stats = M.RunningMoments()
        from ..rewards.sources import RewardSet
        self.rewards = RewardSet.from_config(cfg, has_model=models.reward is not None)
        self.silent_sources: List[str] = []  # the last `score`'s sources that answered None for every sample
        self.scored_samples = self.rewarded_samples = 0  # counted by `score` (the trainer resets them per step)
        self.agents = None
        if getattr(cfg, "env", None) or getattr(cfg, "tools", None):
            from ..agents.step3 import AgentRollouts
            self.agents = AgentRollouts(cfg, self.engine, tokenizer, max_new_tokens)

    @property
    def generation_budget(self) -> int:
        """Generated tokens an answer (a trajectory, over its turns) may hold."""
        return self.max_new_tokens if self.agents is None else self.agents.generation_budget

    @torch.no_grad()
    def rollout(self, batch: Dict[str, Any], generator: Optional[torch.Generator] = None,
                return_logprobs: bool = False, group_size: int = 1) -> Rollout:
        """Answers sampled (with `generator`, else the run's) to a PromptCollator batch,
        `group_size` per prompt (rows b*G .. b*G+G-1 answer prompt b; each prompt is computed
        once by the engine, its KV shared by its answers), with the engine's log-probs of the
        sampled tokens when asked. With an environment (--env, --tools), multi-turn trajectories
        (fastrlhf.agents), laid out the same way."""
        cfg = self.cfg
        if self.agents is not None:
            r = self.agents.rollout(batch, generator or self.generator, self.device, group_size)
            return Rollout(r["sequences"], r["attention_mask"], r["action_mask"], r["prompt_len"],
                           r["engine_logprobs"] if return_logprobs else None, r["turn_index"], r["trajectories"],
                           r["truncated"], r["info"])
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        out = self.engine.generate(input_ids, prompt_mask, max_new_tokens=self.max_new_tokens, do_sample=True,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   min_new_tokens=cfg.min_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                   pad_token_id=self.tokenizer.pad_token_id, generator=generator or self.generator,
                                   return_logprobs=return_logprobs, num_return_sequences=group_size)
        prompt_len = input_ids.shape[1]
        if group_size > 1:
            prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
        action_mask = M.answer_mask(out.sequences[:, prompt_len:], self.tokenizer.eos_token_id)
        attention_mask = torch.cat([prompt_mask.float(), action_mask], 1).long()
        return Rollout(out.sequences, attention_mask, action_mask, prompt_len,
                       out.logprobs if return_logprobs else None)

    def model_scores(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int = 0) -> torch.Tensor:
        """The step-2 reward model's scores [B] (sequences whose first prompt_len columns are the prompt)."""
        reward_tok = self.models.reward_tokenizer
        if reward_tok is not None:  # re-tokenized: no prompt columns to share
            prompt_len = 0
            texts = [self.tokenizer.decode(s[m.bool()], skip_special_tokens=True)
                     for s, m in zip(sequences, attention_mask)]
            reward_tok.padding_side = "right"
            enc = reward_tok(texts, return_tensors="pt", padding=True).to(self.device)
            sequences, attention_mask = enc["input_ids"], enc["attention_mask"]

        def scores(model, seqs, mask, p, **kw):
            return sequence_scores(model, seqs, mask, prompt_len=p, **kw)
        return self.forward_in_passes(scores, self.models.reward, sequences, attention_mask, prompt_len)

    def score(self, batch: Dict[str, Any], rollout: Rollout, group_size: int = 1):
        """Every reward source on a rollout -> (scores [B], sample_mask [B], the sources' RewardResult
        or None when the reward model is the only source; `reward_stats` turns it into metrics).

        A sample some source gave None scores its group's mean over the scored samples (0 when none
        is), so it moves no baseline; sample_mask marks it 0, to be left out of the loss."""
        model = None
        if self.models.reward is not None:
            model = self.model_scores(rollout.sequences, rollout.attention_mask, rollout.prompt_len).tolist()
        texts = self.completion_texts(rollout) if self.rewards.sources else []
        columns = batch.get("columns") or {}
        result = self.rewards.compute(batch["prompt"], texts, columns, model) if self.rewards.sources else None
        total = result.total if result is not None else model
        if rollout.trajectories is not None:  # the environment's step rewards, a source of their own
            from ..agents.step3 import add_env_rewards
            result, total = add_env_rewards(result, total, rollout.trajectories, self.agents.has_env_rewards)
        valid = torch.tensor([t is not None for t in total], dtype=torch.float32, device=self.device)
        filled = torch.tensor([0.0 if t is None else t for t in total], dtype=torch.float32, device=self.device)
        if bool((valid == 0).any()):
            g = max(group_size, 1) if len(total) % max(group_size, 1) == 0 else 1
            v, f = valid.view(-1, g), filled.view(-1, g)
            mean = (f * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)
            filled = torch.where(v > 0, f, mean).view(-1)
        self.silent_sources = result.silent_sources() if result is not None else []
        self.scored_samples += len(total)
        self.rewarded_samples += sum(t is not None for t in total)
        return filled, valid, result

    def score_all_ranks(self, batch: Dict[str, Any], rollout: Rollout):
        """`score`, with a failure on any rank stopping every rank (none waits in a collective)."""
        from ..errors import RewardError
        from ..utils.distributed import all_ranks_true
        error = None
        try:
            out = self.score(batch, rollout, self.cfg.group_size)
        except RewardError as e:
            error = e
        if not all_ranks_true(error is None):
            raise error if error is not None else RewardError("a reward source failed on another process; "
                                                              "see its message")
        return out

    def answers_text(self, sequences: torch.Tensor, action_mask: torch.Tensor, prompt_len: int) -> List[str]:
        return [self.tokenizer.decode(s[prompt_len:][m.bool()], skip_special_tokens=True)
                for s, m in zip(sequences, action_mask)]

    def completion_texts(self, rollout: Rollout) -> List[str]:
        """What reward sources score as completions: the answers, or a trajectory's every token
        after its prompt (the model's turns and the environment's)."""
        if rollout.trajectories is not None:
            return [t.completion_text(self.tokenizer) for t in rollout.trajectories]
        return self.answers_text(rollout.sequences, rollout.action_mask, rollout.prompt_len)

    def rollout_records(self, scored: "ScoredRollout"):
        """(prompts, turns, rewards) of a scored rollout for rollouts.jsonl: each answer one assistant
        turn, or a trajectory's turns; the reward None for a sample without one."""
        r = scored.rollout
        rewards = [s if m > 0 else None for s, m in zip(scored.scores.tolist(), scored.sample_mask.tolist())]
        if r.trajectories is not None:
            return [t.prompt for t in r.trajectories], [t.turns for t in r.trajectories], rewards
        turns = [[{"role": "assistant", "text": a, "trained": True}] for a in self.completion_texts(r)]
        return list(scored.batch["prompt"]), turns, rewards

    def ground_truth(self, prompts: List[str], rollout: Rollout) -> List[float]:
        return [self.gt_score(p, a) for p, a in zip(prompts, self.completion_texts(rollout))]

    @torch.no_grad()
    def sample(self, items: List[Dict[str, Any]]) -> "ScoredRollout":
        """Answers to prompt items (each answered group_size times, the samples adjacent; the engine
        computes each prompt once for its group), scored by every reward source; no model pass yet
        (dynamic sampling filters what comes out of here)."""
        cfg = self.cfg
        g = max(cfg.group_size, 1)
        prompts = to_device(self.collate(items), self.device)
        # the batch the scorers see: each item once per answer, adjacent (the rollout's row order)
        batch = repeat_rows(prompts, g)
        clock = stopwatch(self.device)
        rollout = self.rollout(prompts, return_logprobs=True, group_size=g)
        gen_time = clock()
        scores, sample_mask, result = self.score_all_ranks(batch, rollout)
        answers = rollout.sequences[:, rollout.prompt_len:]
        truncated = rollout.truncated if rollout.truncated is not None else M.truncated_answers(
            rollout.action_mask, answers, self.tokenizer.eos_token_id, self.max_new_tokens)
        penalty = None
        if cfg.overlong_buffer_len is not None:
            penalty = M.overlong_penalty(rollout.action_mask.sum(-1), self.generation_budget, cfg.overlong_buffer_len,
                                         cfg.overlong_penalty_factor or 1.0)
        return ScoredRollout(batch, rollout, scores, sample_mask, result, truncated, penalty,
                             {"gen_time": gen_time, "time_reward_forward": clock()})

    @torch.no_grad()
    def make(self, items: List[Dict[str, Any]], kl_coef: float, old_logprobs: bool = True) -> Experience:
        """`experience(sample(items), ...)`: an Experience from prompt items."""
        return self.experience(self.sample(items), kl_coef, old_logprobs)

    @torch.no_grad()
    def experience(self, scored: "ScoredRollout", kl_coef: float, old_logprobs: bool = True) -> Experience:
        """The model passes on scored answers (actor, reference, critic) and the advantages.
        old_logprobs=False skips the actor's forward: the update's own forward gives them (valid
        when the policy is unchanged until every mini-batch has been through it); with
        --old_logprobs engine the engine's log-probs stand in for it."""
        cfg, models, batch, rollout = self.cfg, self.models, scored.batch, scored.rollout
        sequences, attention_mask, action_mask, P = (rollout.sequences, rollout.attention_mask, rollout.action_mask,
                                                     rollout.prompt_len)
        clock = stopwatch(self.device)
        models.actor.eval()
        times, old_logp, ref_logp = dict(scored.times), None, None
        if cfg.old_logprobs == "engine":
            old_logp = rollout.engine_logprobs
        elif old_logprobs:
            old_logp = self.forward_in_passes(answer_logprobs, models.actor, sequences, attention_mask, P)
            times["time_actor_forward"] = clock()
        if models.ref is not None:
            ref_logp = self.forward_in_passes(answer_logprobs, models.ref, sequences, attention_mask, P)
            times["time_ref_forward"] = clock()
        scores, sample_mask = scored.scores, scored.sample_mask
        answer_len = action_mask.sum(1).mean().item()
        action_mask = action_mask * sample_mask[:, None]  # samples without a reward are out of the loss
        if cfg.mask_truncated:  # cut answers leave the loss; their rewards still count in their group
            action_mask = action_mask * (~scored.truncated)[:, None].float()
        values = None
        if models.critic is not None:
            values = self.forward_in_passes(answer_values, models.critic, sequences, attention_mask, P)
            times["time_critic_forward"] = clock()
        raw_scores = scores.clone()
        if scored.penalty is not None:
            scores = scores + scored.penalty
        if cfg.normalize_reward:
            self.reward_stats.update(all_gather_cat(scores[sample_mask > 0]))
            scores = self.reward_stats.normalize(scores)
        adv, returns, stats = compute_advantages(cfg.advantage_settings(), scores, action_mask, old_logp,
                                                 ref_logp, values, kl_coef)
        n_tokens = action_mask.sum().item()
        scored_rows = raw_scores[sample_mask > 0]
        gen_time = times.pop("gen_time")
        info = {"reward_mean": scored_rows.mean().item() if len(scored_rows) else float("nan"),
                "reward_std": scored_rows.std().item() if len(scored_rows) > 1 else 0.0,
                "reward_abs_max": scored_rows.abs().max().item() if len(scored_rows) else 0.0,
                **reward_stats(scored.result), "kl_coef": kl_coef, "answer_len": answer_len,
                "truncated": float(scored.truncated.sum()), "gen_time": gen_time,
                "forward_time": sum(times.values()), "gen_tokens_per_s": n_tokens / max(gen_time, 1e-9), **times}
        if scored.penalty is not None:
            info["overlong_penalty"] = scored.penalty.mean().item()
        if self.gt_score is not None:
            info["gt_score"] = float(np.mean(self.ground_truth(batch["prompt"], rollout)))
        info.update(rollout.info)
        return Experience(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                          old_logprobs=old_logp, ref_logprobs=ref_logp, advantages=adv, scores=raw_scores,
                          prompt_len=P, old_values=values, returns=returns, rollout_logprobs=rollout.engine_logprobs,
                          info=info, sample_mask=sample_mask, turn_index=rollout.turn_index)

    def forward_in_passes(self, fn: Callable, model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                          prompt_len: int) -> torch.Tensor:
        """fn(model, sequences, attention_mask, prompt_len) -> [B, N]; with --packing, run as passes of
        packed rows under the token budget (`packing.plan_passes`), the results put back in row order
        (and with --share_prompts, each pass's groups running their prompt once)."""
        if not self.cfg.packing:
            return fn(model, sequences, attention_mask, prompt_len)
        passes = plan_passes(attention_mask.sum(1).tolist(), self.cfg.max_tokens_per_micro_batch)
        kw = dict(packed=True, share_prompt=self.cfg.sharing_prompts)
        if len(passes) == 1:
            return fn(model, sequences, attention_mask, prompt_len, **kw)
        out = None
        for rows in passes:
            idx = torch.tensor(rows, device=sequences.device)
            part = fn(model, sequences[idx], attention_mask[idx], prompt_len, **kw)
            out = part.new_zeros(len(sequences), *part.shape[1:]) if out is None else out
            out[idx] = part
        return out

    @torch.no_grad()
    def eval_sums(self, batch: Dict[str, Any], generator: torch.Generator) -> List[float]:
        """[summed reward of the rewarded answers, summed KL to the reference (0 without one), summed
        ground truth, answers, rewarded answers] of answers sampled (with `generator`) to a batch of
        held-out prompts."""
        r = self.rollout(batch, generator)
        kl = torch.zeros(1)
        if self.models.ref is not None:
            logp = answer_logprobs(self.models.actor, r.sequences, r.attention_mask, r.prompt_len)
            ref = answer_logprobs(self.models.ref, r.sequences, r.attention_mask, r.prompt_len)
            kl = (M.kl_estimate(logp, ref, "k1") * r.action_mask).sum(1)
        scores, rewarded, _ = self.score(batch, r, len(r.sequences))
        gt = sum(self.ground_truth(batch["prompt"], r)) if self.gt_score else 0.0
        return [(scores * rewarded).double().sum().item(), kl.double().sum().item(), gt, float(len(r.sequences)),
                rewarded.double().sum().item()]
