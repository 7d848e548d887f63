"""Step 3: the update loop of PPO and the critic-free GRPO / RLOO / REINFORCE++.

The algorithms differ only in what their record in `algorithms.ALGORITHMS` says: how advantages
are made, whether a critic exists, and their defaults. Each step: sample rollouts on the next prompts
(`experience.ExperienceMaker`), then `ppo_epochs` passes over them in mini-batches of
`micro_batch_size` answers: a clipped policy loss for the actor (with the GRPO family's options:
loss aggregation, clip-higher, dual-clip, GSPO's sequence ratio, truncated importance sampling;
plus the KL loss of GRPO, an entropy bonus and the SFT loss of PPO-ptx), a clipped value loss for
the critic. With one optimizer step per rollout the rollout policy's log-probs are taken from the
update's own forward, not a second pass. The models are built by `ppo_models`; the loop,
checkpoints, resume and evaluation schedule are the shared `trainer.Trainer`'s.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import NonFiniteLossError
from ..models.loading import load_tokenizer
from ..utils.distributed import all_ranks_true, barrier, is_rank0, mean_over_ranks
from . import rl_math as M
from .batches import GlobalBatchSampler, eval_sums, to_device, total_train_steps
from .configs import PPOConfig
from .experience import Experience, ExperienceMaker, answer_logprobs, answer_values, rollout_stats, stopwatch
from .ppo_models import build_ppo_models, check_lengths, reward_tokenizer_for
from .run_setup import setup_run
from .sft import sequence_nll
from .trainer import Trainer

HUGE_REWARD = 1e4  # a divergence after rewards this large names their scale first


def bundled_task_scorer(cfg) -> Optional[Any]:
    """The exact scorer of the bundled task, when that is the data being trained on."""
    if getattr(cfg.data, "paths", None):
        return None
    from ..data.default_task import ground_truth_score
    return ground_truth_score


@dataclass
class UpdateResult:
    """What one update computed: its metrics (means over the applied mini-batches) and, when the
    rollout left them to it, the rollout policy's log-probs [B, N] from its own forward."""
    metrics: Dict[str, float]
    old_logprobs: Optional[torch.Tensor] = None


class PPOTrainer(Trainer):
    """Construct with a PPOConfig; `run()` evaluates, trains and saves; `train_step()` is one PPO
    step and `evaluate()` scores held-out prompts.

    Models may be passed in (tests, custom setups) as `models={"actor": ..., "ref": ...,
    "reward": ..., "critic": ...}`, and `tokenizer=`, `prompts=` / `eval_prompts=` (step-3 data
    items) and `ptx_data=` (step-1 items); anything not given is loaded from cfg."""

    def __init__(self, cfg: PPOConfig, *, models: Optional[Dict[str, torch.nn.Module]] = None,
                 tokenizer=None, prompts: Optional[List[Dict[str, Any]]] = None,
                 eval_prompts: Optional[List[Dict[str, Any]]] = None, ptx_data=None):
        ctx = setup_run(cfg, check_tokenizers=tokenizer is None)  # validates (accumulation vs the world size too)
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model_name_or_path, padding_side="left")
        super().__init__(cfg, ctx, tokenizer)
        self.label = f"step 3 ({cfg.algo})"
        models = dict(models or {})
        reward_tokenizer = None if "reward" in models else reward_tokenizer_for(cfg, tokenizer)
        if prompts is None or eval_prompts is None:
            from ..data import build_datasets
            train_p, eval_p = build_datasets(cfg.data, tokenizer, 3)
            prompts = [train_p[i] for i in range(len(train_p))] if prompts is None else prompts
            eval_prompts = [eval_p[i] for i in range(len(eval_p))] if eval_prompts is None else eval_prompts
        self.prompts, self.eval_prompt_items = prompts, eval_prompts
        max_new_tokens = cfg.max_new_tokens or cfg.data.max_answer_len
        check_lengths(cfg, models, max(len(p["prompt_input_ids"]) for p in prompts + eval_prompts), max_new_tokens)
        self.sampler = GlobalBatchSampler(len(prompts), cfg.rollout_batch_size, 1, ctx.world_size, ctx.rank, cfg.seed,
                                          what="the prompt set", fix="lower --rollout_batch_size or add prompts")
        self.total_steps = total_train_steps(cfg, self.sampler.steps_per_epoch)
        self.updates_per_step = cfg.ppo_epochs * (cfg.answers_per_step // cfg.micro_batch_size)
        optimizer_steps = self.total_steps * self.updates_per_step // ctx.accumulation
        self.models = build_ppo_models(cfg, ctx, tokenizer, max(1, optimizer_steps), models, reward_tokenizer)
        self.actor, self.critic, self.ref, self.ema = (self.models.actor, self.models.critic, self.models.ref,
                                                       self.models.ema)
        self.rollouts = ExperienceMaker(cfg, self.models, tokenizer, ctx.device, ctx.rank, max_new_tokens,
                                        bundled_task_scorer(cfg))
        self.kl_ctl = (M.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else M.FixedKLController(cfg.kl_coef))
        self.old_logprobs_from_update = self._policy_unchanged_through_update()
        self.ptx_data = ptx_data if ptx_data is not None else (
            self._load_ptx() if cfg.ptx_coef > 0 else None)
        self.ptx_sampler = None if self.ptx_data is None else GlobalBatchSampler(
            len(self.ptx_data), cfg.micro_batch_size, 1, ctx.world_size, ctx.rank, cfg.seed,
            what="the PPO-ptx (SFT) set", fix="lower --micro_batch_size or --ptx_coef 0")

    step_noun = "PPO steps"
    diverged_error = NonFiniteLossError
    _reward_abs_max: Optional[float] = None  # the last step's largest |reward| (before clipping)

    def divergence_hint(self) -> str:
        hint = "lower --learning_rate, raise --kl_coef, set --reward_clip, or use fp32/bf16 instead of fp16"
        scale = self._reward_abs_max
        if scale is None or scale < HUGE_REWARD:
            return hint
        clip = f"--reward_clip {self.cfg.reward_clip:g}" if self.cfg.reward_clip else "--reward_clip 0 (off)"
        return (f"the rewards reached |reward| {scale:.3g} ({clip}): scale the reward sources down or set "
                f"--reward_clip (e.g. 5); else {hint}")

    def has_eval_data(self) -> bool:
        return len(self.eval_prompt_items[:self.cfg.eval_prompts]) > 0

    def _policy_unchanged_through_update(self) -> bool:
        """True when the rollout-time actor log-probs can come from the update's own forward
        (ratio = exp(logp - logp.detach())) instead of a separate pass: one epoch and one optimizer
        step per rollout (the policy changes only after every mini-batch has been through it), and
        the advantages do not need them (no KL penalty in the reward)."""
        cfg = self.cfg
        one_step = cfg.ppo_epochs == 1 and cfg.answers_per_step == cfg.micro_batch_size * self.ctx.accumulation
        return one_step and not (cfg.advantage_settings().kl_in_reward and cfg.kl_coef > 0)

    def _load_ptx(self):
        from ..data import build_datasets
        return build_datasets(self.cfg.data, self.tokenizer, 1)[0]

    # ------------------------------------------------------------------ one step

    def train_step(self) -> Dict[str, float]:
        """Rollouts on the next prompts, then the update. Returns the step's metrics (mean over ranks)."""
        t0 = time.perf_counter()
        items = [self.prompts[i] for i in self.sampler.next_step()[0]]
        exp = self.rollouts.make(items, self.kl_ctl.value, old_logprobs=not self.old_logprobs_from_update)
        t1 = time.perf_counter()
        finite = all_ranks_true(all(torch.isfinite(t).all() for t in (
            exp.advantages, exp.scores, exp.old_logprobs, exp.ref_logprobs, exp.returns) if t is not None))
        metrics, old_logprobs = dict(exp.info), exp.old_logprobs
        self._reward_abs_max = metrics.get("reward_abs_max")  # named when the run diverges (divergence_hint)
        if finite:
            result = self.update(exp)
            metrics.update(result.metrics)
            if old_logprobs is None:
                old_logprobs = result.old_logprobs
        else:
            metrics["skipped_updates"] = float(self.updates_per_step)
        t2 = time.perf_counter()
        self.count_nonfinite(None if metrics["skipped_updates"] < self.updates_per_step else
                             "losses or gradients" if finite else "rollout rewards, values or log-probs")
        metrics.update(rollout_stats(exp, old_logprobs, self.cfg.kl_estimator))
        if "kl" in metrics:  # the controller sees the all-rank KL, so every rank keeps the same coefficient
            self.kl_ctl.update(mean_over_ranks(metrics["kl"]), len(exp) * self.ctx.world_size)
        if self.ema is not None:
            self.ema.update(self.actor.module)
        n_tokens = exp.attention_mask.sum().item() * self.ctx.world_size
        metrics.update(train_time=t2 - t1, step_time=t2 - t0, tokens_per_s=n_tokens / max(t2 - t0, 1e-9),
                       nonfinite_steps=float(self.nonfinite_total))
        return {k: mean_over_ranks(v) for k, v in sorted(metrics.items())}

    def update(self, exp: Experience) -> UpdateResult:
        """`ppo_epochs` shuffled passes over the rollout batch in mini-batches of micro_batch_size.
        `exp` is read, never written: what the update computed comes back in the result."""
        cfg = self.cfg
        sums: Dict[str, float] = {}
        count, skipped = 0, 0
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        g = torch.Generator().manual_seed(cfg.seed * 31 + self.step)
        clock, t_actor, t_critic = stopwatch(self.ctx.device), 0.0, 0.0
        old_logprobs = None
        if exp.old_logprobs is None:  # filled, mini-batch by mini-batch, by the update's own forward
            old_logprobs = torch.zeros_like(exp.action_mask)
        for _ in range(cfg.ppo_epochs):
            for mb_idx in torch.randperm(len(exp), generator=g).split(cfg.micro_batch_size):
                mb = exp.select(mb_idx.to(exp.sequences.device))
                clock()
                stats, mb_old_logprobs = self._actor_step(mb)
                t_actor += clock()
                if old_logprobs is not None:
                    old_logprobs[mb_idx.to(exp.sequences.device)] = mb_old_logprobs
                if self.critic is not None and stats is not None:
                    critic_stats = self._critic_step(mb)
                    t_critic += clock()
                    stats = None if critic_stats is None else {**stats, **critic_stats}
                if stats is None:
                    skipped += 1
                    continue
                count += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out.update(skipped_updates=float(skipped), time_actor_train=t_actor, time_critic_train=t_critic)
        return UpdateResult(out, old_logprobs)

    def _finite_or_skip(self, loss: torch.Tensor) -> bool:
        """Agreed over ranks (ZeRO collectives stay in step). A mini-batch with a non-finite loss is
        skipped; with gradient accumulation it cannot be (its window's other mini-batches already
        hold gradients), so the run stops."""
        if all_ranks_true(bool(torch.isfinite(loss).all())):
            return True
        if self.ctx.accumulation > 1:
            raise NonFiniteLossError(
                f"a NaN/inf loss at step {self.step + 1} inside a gradient-accumulation window; lower "
                "--learning_rate, or drop --global_batch_size so that bad mini-batches can be skipped")
        return False

    def _actor_step(self, mb: Experience) -> Tuple[Optional[Dict[str, float]], torch.Tensor]:
        """One actor mini-batch -> (its stats, None when skipped; the rollout policy's log-probs
        of its answers: `mb.old_logprobs`, or this forward's when the rollout skipped them)."""
        cfg = self.cfg
        logp, entropy = answer_logprobs(self.actor, mb.sequences, mb.attention_mask, mb.prompt_len, with_entropy=True)
        # one optimizer step per rollout: this forward is the rollout policy's
        old_logprobs = logp.detach() if mb.old_logprobs is None else mb.old_logprobs
        mask, agg = mb.action_mask, dict(mode=cfg.loss_agg, norm_len=self.rollouts.max_new_tokens)
        low, high = cfg.clip_range()
        is_weights = None
        if cfg.tis_cap is not None and mb.rollout_logprobs is not None:
            is_weights = M.truncated_is_weights(old_logprobs, mb.rollout_logprobs, cfg.tis_cap)
        loss, st = M.clipped_policy_loss(logp, old_logprobs, mb.advantages, mask, low,
                                         clip_eps_high=high, dual_clip=cfg.dual_clip,
                                         importance_level=cfg.importance_level, loss_agg=cfg.loss_agg,
                                         norm_len=agg["norm_len"], is_weights=is_weights)
        stats = {"policy_loss": loss.item(), **{k: v.item() for k, v in st.items()},
                 "entropy": M.masked_mean(entropy.detach(), mask).item()}
        if is_weights is not None:
            stats["tis_weight"] = M.masked_mean(is_weights, mask).item()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * M.aggregate_loss(entropy, mask, **agg)
        if not cfg.advantage_settings().kl_in_reward and self.kl_ctl.value > 0:
            kl_loss = M.aggregate_loss(M.kl_estimate(logp, mb.ref_logprobs, "k3"), mask, **agg)
            loss = loss + self.kl_ctl.value * kl_loss
            stats["kl_loss"] = kl_loss.item()
        if cfg.ptx_coef > 0 and self.ptx_data is not None:
            ptx = self._ptx_loss()
            loss = loss + cfg.ptx_coef * ptx
            stats["ptx_loss"] = ptx.item()
        if not self._finite_or_skip(loss.detach()):
            return None, old_logprobs
        self.actor.backward(loss)
        if self.actor.step() is False:  # NaN/inf gradients: the update was not applied
            return None, old_logprobs
        return stats, old_logprobs

    def _critic_step(self, mb: Experience) -> Optional[Dict[str, float]]:
        cfg = self.cfg
        values = answer_values(self.critic, mb.sequences, mb.attention_mask, mb.prompt_len)
        loss, st = M.clipped_value_loss(values, mb.old_values, mb.returns, mb.action_mask, cfg.value_clip)
        if not self._finite_or_skip(loss.detach()):
            return None
        self.critic.backward(cfg.value_loss_coef * loss)
        if self.critic.step() is False:
            return None
        err = M.masked_mean((values.detach() - mb.returns) ** 2, mb.action_mask)
        return {"value_loss": loss.item(), "value_clipfrac": st["value_clipfrac"].item(), "value_error": err.item()}

    def _ptx_loss(self) -> torch.Tensor:
        from ..data.collators import SFTCollator
        idx = self.ptx_sampler.next_step()[0]
        batch = to_device(SFTCollator(self.tokenizer.pad_token_id)([self.ptx_data[i] for i in idx]), self.ctx.device)
        total, count = sequence_nll(self.actor, batch)  # SFT's loss, from the fused log-probs
        return total / count.clamp(min=1)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, float]:
        """Mean reward (all sources), ground-truth score (bundled task) and summed KL to the
        reference (when there is one) of answers sampled (fixed seed) to held-out prompts."""
        cfg = self.cfg
        generator = torch.Generator(device=self.ctx.device).manual_seed(10_000 + self.ctx.rank)
        score, kl, gt, n = eval_sums(self.actor, self.eval_prompt_items[:cfg.eval_prompts], self.rollouts.collate,
                                     cfg.eval_batch_size or cfg.rollout_batch_size, self.ctx, cfg.eval_max_batches,
                                     lambda batch: self.rollouts.eval_sums(batch, generator), 4)
        n = n if n > 0 else float("nan")
        out = {"reward": score / n}
        if self.ref is not None:  # none is loaded with kl_coef 0
            out["kl_to_ref"] = kl / n
        if self.rollouts.gt_score is not None:
            out["gt_score"] = gt / n
        return out

    def format_eval(self, before: Dict[str, float], after: Dict[str, float]) -> str:
        rows = [("reward", "reward"), ("ground-truth score", "gt_score"), ("KL to reference", "kl_to_ref")]
        n = len(self.eval_prompt_items[:self.cfg.eval_prompts])
        lines = [f"[{self.label}] on {n} held-out prompts:", f"{'held-out prompts':<22}{'before PPO':>12}{'after PPO':>12}"]
        lines += [f"{label:<22}{before[key]:>12.4f}{after[key]:>12.4f}" for label, key in rows if key in before]
        return "\n".join(lines)

    def postfix(self, metrics: Dict[str, float]) -> Dict[str, str]:
        return {k: f"{metrics[k]:.3g}" for k in ("reward_mean", "gt_score", "kl", "value_error") if k in metrics}

    # ------------------------------------------------------------------ state, checkpoints, export

    def trained_engines(self) -> Dict[str, Any]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def state_dict(self) -> Dict[str, Any]:
        return {"prompts": self.sampler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                "reward_stats": self.rollouts.reward_stats.state_dict(),
                "history": self.history,
                "ptx": None if self.ptx_sampler is None else self.ptx_sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["prompts"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.rollouts.reward_stats.load_state_dict(state["reward_stats"])
        self.history = state["history"]
        if self.ptx_sampler is not None and state["ptx"] is not None:
            self.ptx_sampler.load_state_dict(state["ptx"])

    def rank_state_dict(self) -> Dict[str, Any]:
        return {"generator": self.rollouts.generator.get_state()}

    def load_rank_state_dict(self, state: Dict[str, Any]) -> None:
        self.rollouts.generator.set_state(state["generator"])

    def save_extra(self, ckpt_dir: str) -> None:
        if self.ema is not None and is_rank0():  # the shadow is the same full copy on every rank
            torch.save(self.ema.state_dict(), os.path.join(ckpt_dir, "ema.pt"))

    def load_extra(self, ckpt_dir: str) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(os.path.join(ckpt_dir, "ema.pt"), weights_only=False))

    def train(self) -> List[Dict[str, float]]:
        history = super().train()
        if is_rank0() and history:
            from .plots import plot_ppo_history
            plot_ppo_history(history, os.path.join(self.cfg.output_dir, "ppo_curves.png"))
        return history

    def save_final(self) -> Dict[str, str]:
        """actor/ (LoRA merged unless merge_lora_on_save is off), critic/, and actor_ema/ when EMA is
        on, each an HF model dir with the tokenizer."""
        from .checkpoint import lora_scalings, merge_lora_state_dict, save_hf_model, unwrap_peft
        out_dir = self.cfg.output_dir
        paths = {"actor": os.path.join(out_dir, "actor")}
        save_hf_model(self.actor, paths["actor"], tokenizer=self.tokenizer, merge_lora=self.cfg.merge_lora_on_save)
        if self.critic is not None:
            paths["critic"] = os.path.join(out_dir, "critic")
            save_hf_model(self.critic, paths["critic"], tokenizer=self.tokenizer, merge_lora=True)
        if self.ema is not None:
            paths["actor_ema"] = os.path.join(out_dir, "actor_ema")
            if is_rank0():  # fp32, LoRA always merged (the shadow holds the adapters beside the base weights)
                module = self.actor.module
                scalings = lora_scalings(module)
                sd = merge_lora_state_dict(self.ema.shadow, scalings) if scalings else self.ema.shadow
                unwrap_peft(module).save_pretrained(paths["actor_ema"], state_dict=sd)
                self.tokenizer.save_pretrained(paths["actor_ema"])
            barrier()
        return paths


def train_ppo(cfg: PPOConfig, **kwargs) -> Dict[str, Any]:
    """Run step 3 end to end (see PPOTrainer for the keyword arguments): evaluate on held-out
    prompts, train (resuming when a checkpoint is there), evaluate again, save the models.
    Returns the shared run result (eval_before, eval_after, history, paths, trainer)."""
    return PPOTrainer(cfg, **kwargs).run()
