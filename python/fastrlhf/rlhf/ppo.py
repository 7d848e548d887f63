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

import copy
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError, NonFiniteLossError, RewardError
from ..models.loading import load_tokenizer
from ..utils.distributed import all_ranks_true, all_reduce_sum, barrier, is_rank0, mean_over_ranks
from ..utils.logging import print_rank0
from . import rl_math as M
from .batches import GlobalBatchSampler, eval_sums, to_device, total_train_steps
from .configs import PPOConfig
from .dynamic_sampling import sample_informative_groups
from .experience import Experience, ExperienceMaker, rollout_stats, stopwatch
from .ppo_models import build_ppo_models, check_lengths, reward_tokenizer_for
from .run_setup import setup_run
from .packing import check_budget, check_models, plan_passes, select_rows
from .sft import labelled_tokens
from .update_losses import actor_loss, critic_loss, ptx_loss
from .trainer import Trainer

HUGE_REWARD = 1e4  # a divergence after rewards this large names their scale first
MAX_UNREWARDED_STEPS = 3  # steps in a row without one rewarded answer that stop the run


def reward_text(value: float, fmt: str = ".3f") -> str:
    """A metric for a message; NaN is a reward that was never computed (no answer was rewarded)."""
    return "no reward" if value != value else format(value, fmt)


def bundled_task_scorer(cfg) -> Optional[Any]:
    """The exact scorer of the bundled task, when that is the data being trained on."""
    if getattr(cfg.data, "paths", None):
        return None
    from ..tasks.default_task import ground_truth_score
    return ground_truth_score


@dataclass
class UpdateResult:
    """What one update computed: its metrics (means over the applied mini-batches) and the rollout
    policy's log-probs [B, N] from its own forwards before its first optimizer step, in the rows
    marked by `fresh_rows` [B] (all of them with one optimizer step per rollout)."""
    metrics: Dict[str, float]
    old_logprobs: Optional[torch.Tensor] = None
    fresh_rows: Optional[torch.Tensor] = None


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
        longest_prompt = max(len(p["prompt_input_ids"]) for p in prompts + eval_prompts)
        # multi-turn: a trajectory fits the model's positions (the rollout stops it there) unless its own
        # budget, when given, cannot
        check_lengths(cfg, models, longest_prompt, cfg.max_trajectory_tokens or max_new_tokens)
        if cfg.packing:
            longest, what = (max_new_tokens, "--max_new_tokens") if not cfg.agentic else (
                cfg.trajectory_budget(max_new_tokens), "the trajectory budget (--max_trajectory_tokens)")
            check_budget(cfg.max_tokens_per_micro_batch, longest_prompt + longest,
                         f"the longest prompt + answer ({longest_prompt} + {what} {longest})")
        self.sampler = GlobalBatchSampler(len(prompts), cfg.rollout_batch_size, 1, ctx.world_size, ctx.rank, cfg.seed,
                                          what="the prompt set", fix="lower --rollout_batch_size or add prompts")
        self.total_steps = total_train_steps(cfg, self.sampler.steps_per_epoch)
        self.updates_per_step = cfg.ppo_epochs * (cfg.answers_per_step // cfg.micro_batch_size)
        optimizer_steps = self.total_steps * self.updates_per_step // ctx.accumulation
        self.models = build_ppo_models(cfg, ctx, tokenizer, max(1, optimizer_steps), models, reward_tokenizer)
        self.actor, self.critic, self.ref, self.ema = (self.models.actor, self.models.critic, self.models.ref,
                                                       self.models.ema)
        if cfg.packing is not False:
            self.cfg = cfg = copy.copy(cfg)
            cfg.packing = self._packing_checked(ctx)
        self.rollouts = ExperienceMaker(cfg, self.models, tokenizer, ctx.device, ctx.rank, max_new_tokens,
                                        bundled_task_scorer(cfg))
        self.kl_ctl = (M.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else M.FixedKLController(cfg.kl_coef))
        self.old_logprobs_from_update = self._policy_unchanged_through_update()
        self.rollout_log = None
        if cfg.log_rollouts and is_rank0():
            from ..agents.step3 import RolloutLog
            self.rollout_log = RolloutLog(cfg.output_dir, cfg.log_rollouts)
        self.ptx_data = ptx_data if ptx_data is not None else (
            self._load_ptx() if cfg.ptx_coef > 0 else None)
        self.ptx_sampler = None if self.ptx_data is None else GlobalBatchSampler(
            len(self.ptx_data), cfg.micro_batch_size, 1, ctx.world_size, ctx.rank, cfg.seed,
            what="the PPO-ptx (SFT) set", fix="lower --micro_batch_size or --ptx_coef 0")

    def _packing_checked(self, ctx) -> bool:
        """Probe every model for packed rows (`packing.check_packed_attention`): with --packing a
        model that fails is an error; unset (step 3's default), the run then trains padded, saying why."""
        cfg = self.cfg
        try:
            check_models({"actor": self.actor}, ctx, recompute=cfg.gradient_checkpointing, share=cfg.sharing_prompts)
            check_models({"critic": self.critic, "reference model": self.ref, "reward model": self.models.reward}, ctx,
                         share=cfg.sharing_prompts)
        # packing unset: any model the probe cannot run (e.g. a custom wrapper) makes the run train padded
        except Exception as e:  # noqa: BLE001
            if cfg.packing:
                raise
            why = str(e) if isinstance(e, ConfigError) else f"the packing probe failed: {type(e).__name__}: {e}"
            print_rank0(f"step 3 trains on padded batches (packing is on by default where every model can run it; "
                        f"--packing false silences this): {why}")
            return False
        return True

    step_noun = "PPO steps"
    diverged_error = NonFiniteLossError
    _reward_abs_max: Optional[float] = None  # the last step's largest |reward| (before clipping)
    unrewarded_streak = 0  # steps in a row none of whose answers got a reward

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
        next_items = lambda: [self.prompts[i] for i in self.sampler.next_step()[0]]  # noqa: E731
        self.rollouts.scored_samples = self.rollouts.rewarded_samples = 0
        sampling: Dict[str, float] = {}
        if self.cfg.dynamic_sampling:
            scored, sampling = sample_informative_groups(self.rollouts, next_items, self.cfg)
        else:
            scored = self.rollouts.sample(next_items())
        if self.rollout_log is not None:
            self.rollout_log.write(self.step + 1, *self.rollouts.rollout_records(scored))
        exp = self.rollouts.experience(scored, self.kl_ctl.value, old_logprobs=not self.old_logprobs_from_update)
        self._check_rewarded()
        t1 = time.perf_counter()
        finite = all_ranks_true(all(torch.isfinite(t).all() for t in (
            exp.advantages, exp.scores, exp.old_logprobs, exp.ref_logprobs, exp.returns) if t is not None))
        metrics, trainer_logprobs, rows = {**exp.info, **sampling}, exp.old_logprobs, None
        self._reward_abs_max = metrics.get("reward_abs_max")  # named when the run diverges (divergence_hint)
        if finite:
            result = self.update(exp)
            metrics.update(result.metrics)
            if self.cfg.old_logprobs == "engine":  # the trainer's own numbers, where the update saw them first
                trainer_logprobs, rows = result.old_logprobs, result.fresh_rows
            elif trainer_logprobs is None:
                trainer_logprobs = result.old_logprobs
        else:
            metrics["skipped_updates"] = float(self.updates_per_step)
        t2 = time.perf_counter()
        self.count_nonfinite(None if metrics["skipped_updates"] < self.updates_per_step else
                             "losses or gradients" if finite else "rollout rewards, values or log-probs")
        if finite or self.cfg.old_logprobs != "engine":
            metrics.update(rollout_stats(exp, trainer_logprobs, self.cfg.kl_estimator, rows,
                                         self.cfg.max_turns if self.rollouts.agents is not None else 0))
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
        # the update's own forwards before its first optimizer step are the rollout policy's
        fresh, fresh_rows = torch.zeros_like(exp.action_mask), torch.zeros(len(exp), dtype=torch.bool)
        n_mb = 0
        for _ in range(cfg.ppo_epochs):
            for mb_idx in torch.randperm(len(exp), generator=g).split(cfg.micro_batch_size):
                mb_idx = mb_idx.to(exp.sequences.device)
                mb = exp.select(mb_idx)
                clock()
                stats, mb_logprobs = self._actor_step(mb)
                t_actor += clock()
                if n_mb < self.ctx.accumulation:
                    fresh[mb_idx], fresh_rows[mb_idx.cpu()] = mb_logprobs, True
                n_mb += 1
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
        return UpdateResult(out, fresh, fresh_rows)

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

    def _passes(self, mb: Experience) -> List[Optional[torch.Tensor]]:
        """The mini-batch's rows per pass: [None] (all in one, padded or packed), or packed rows
        under --max_tokens_per_micro_batch (the same number of passes on every rank)."""
        if not self.cfg.packing or self.cfg.max_tokens_per_micro_batch is None:
            return [None]
        rows = plan_passes(mb.attention_mask.sum(1).tolist(), self.cfg.max_tokens_per_micro_batch)
        return [None] if len(rows) == 1 else [torch.tensor(r, device=mb.sequences.device) for r in rows]

    def _train_passes(self, engine, passes) -> Optional[Dict[str, float]]:
        """Backward each pass (a closure giving its loss and additive stats), then one optimizer
        step -> the summed stats, None when the step was skipped (a NaN/inf loss: every pass is
        still run, so that collectives stay in step, and the step is refused) or not applied."""
        stats: Dict[str, float] = {}
        bad = False
        for i, run in enumerate(passes):
            loss, st = run()
            if not self._finite_or_skip(loss.detach()):
                if len(passes) == 1:
                    return None
                bad = True
            engine.backward(loss, last_pass=i == len(passes) - 1)
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v
        if engine.step(skip=bad) is False or bad:  # False: NaN/inf gradients, the update was not applied
            return None
        return stats

    def _actor_step(self, mb: Experience) -> Tuple[Optional[Dict[str, float]], torch.Tensor]:
        """One actor mini-batch (its passes, then PPO-ptx's) -> (its stats, None when skipped; the
        actor's log-probs of its answers from this forward, before this mini-batch's step)."""
        cfg, rows_of = self.cfg, self._passes(mb)
        totals = None if rows_of == [None] else M.BatchTotals.of(mb.action_mask)
        logprobs = torch.zeros_like(mb.action_mask)

        def actor_pass(rows):
            part = mb if rows is None else mb.select(rows)
            loss, st, logp = actor_loss(cfg, self.actor, part, self.kl_ctl.value, self.rollouts.generation_budget,
                                        totals, packed=cfg.packing)
            logprobs[slice(None) if rows is None else rows] = logp
            return loss, st
        passes = [functools.partial(actor_pass, rows) for rows in rows_of]
        if cfg.ptx_coef > 0 and self.ptx_data is not None:
            passes += self._ptx_passes()
        return self._train_passes(self.actor, passes), logprobs

    def _critic_step(self, mb: Experience) -> Optional[Dict[str, float]]:
        rows_of = self._passes(mb)
        totals = None if rows_of == [None] else M.BatchTotals.of(mb.action_mask)
        return self._train_passes(self.critic, [
            functools.partial(critic_loss, self.cfg, self.critic, mb if rows is None else mb.select(rows), totals,
                              self.cfg.packing) for rows in rows_of])

    def _ptx_passes(self):
        """PPO-ptx: the next SFT batch's loss (from the fused log-probs), as passes like the actor's."""
        from ..data.collators import SFTCollator
        idx = self.ptx_sampler.next_step()[0]
        batch = to_device(SFTCollator(self.tokenizer.pad_token_id)([self.ptx_data[i] for i in idx]), self.ctx.device)
        labelled = labelled_tokens(batch)
        budget = self.cfg.max_tokens_per_micro_batch if self.cfg.packing else None
        rows_of = [None] if budget is None else plan_passes(batch["attention_mask"].sum(1).tolist(), budget)
        return [functools.partial(ptx_loss, self.cfg, self.actor, batch if rows is None else select_rows(batch, rows),
                                  labelled, self.cfg.packing) for rows in rows_of]

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, float]:
        """Mean reward (all sources), ground-truth score (bundled task) and summed KL to the
        reference (when there is one) of answers sampled (fixed seed) to held-out prompts."""
        cfg = self.cfg
        generator = torch.Generator(device=self.ctx.device).manual_seed(10_000 + self.ctx.rank)
        score, kl, gt, n, rewarded = eval_sums(self.actor, self.eval_prompt_items[:cfg.eval_prompts],
                                               self.rollouts.collate, cfg.eval_batch_size or cfg.rollout_batch_size,
                                               self.ctx, cfg.eval_max_batches,
                                               lambda batch: self.rollouts.eval_sums(batch, generator), 5)
        n = n if n > 0 else float("nan")
        # over the rewarded answers only; NaN (printed "no reward") when no source rewarded any
        out = {"reward": score / rewarded if rewarded > 0 else float("nan")}
        if self.ref is not None:  # none is loaded with kl_coef 0
            out["kl_to_ref"] = kl / n
        if self.rollouts.gt_score is not None:
            out["gt_score"] = gt / n
        return out

    def format_metrics(self, metrics: Dict[str, float]) -> str:
        return ", ".join(f"{k} {reward_text(v, '.4f')}" for k, v in metrics.items())

    def format_eval(self, before: Dict[str, float], after: Dict[str, float]) -> str:
        rows = [("reward", "reward"), ("ground-truth score", "gt_score"), ("KL to reference", "kl_to_ref")]
        n = len(self.eval_prompt_items[:self.cfg.eval_prompts])
        lines = [f"[{self.label}] on {n} held-out prompts:", f"{'held-out prompts':<22}{'before PPO':>12}{'after PPO':>12}"]
        lines += [f"{label:<22}{reward_text(before[key], '.4f'):>12}{reward_text(after[key], '.4f'):>12}"
                  for label, key in rows if key in before]
        return "\n".join(lines)

    def _check_rewarded(self) -> None:
        """A step none of whose sampled answers (on any rank) got a reward learns nothing: warned about,
        and MAX_UNREWARDED_STEPS in a row stop the run, naming the sources that answered only None."""
        counts = torch.tensor([float(self.rollouts.rewarded_samples), float(self.rollouts.scored_samples)],
                              device=self.ctx.device)
        rewarded, n = (int(c) for c in all_reduce_sum(counts).tolist())
        if rewarded > 0:
            self.unrewarded_streak = 0
            return
        self.unrewarded_streak += 1
        silent = self.rollouts.silent_sources
        who = " and ".join(silent) or "the sources together (each sample had some source answer None)"
        if self.unrewarded_streak >= MAX_UNREWARDED_STEPS:
            raise RewardError(f"{self.unrewarded_streak} consecutive steps had no rewarded answer: {who} returned "
                              "None for all of them (a null answer column? a server answering null?); check the "
                              "reward source, or the dataset columns it reads")
        print_rank0(f"[{self.label}] warning: step {self.step + 1}: none of the {n} answers got a reward ({who} "
                    f"returned None for every one): this step learns nothing ({self.unrewarded_streak} in a row; "
                    f"the run stops at {MAX_UNREWARDED_STEPS})")

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
