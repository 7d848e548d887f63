"""Step 3: PPO (and the critic-free GRPO / RLOO) over actor, critic, reference and reward models.

One trainer, three algorithms: they differ only in how advantages are made
(`experience.compute_advantages`) and in whether a critic exists. The actor and critic are
DeepSpeed engines (each with its own ZeRO stage / offload / learning rate); the reference and
reward models are frozen (ZeRO-3-partitioned engines when asked, plain modules otherwise).
Rollouts are sampled by the hybrid engine.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, TrainConfig, _opt, build_ds_config
from ..utils import (MetricsLogger, barrier, get_rank, get_world_size, init_distributed, is_rank0,
                     print_rank0, progress_bar)
from . import rl_math as M
from .checkpoint import rng_state, set_rng_state
from .experience import (AdvantageSettings, Experience, answer_logprobs, answer_values,
                         compute_advantages, sequence_scores)


@dataclass
class PPOConfig(TrainConfig):
    """Step 3. `model_name_or_path` is the actor (the SFT model); `learning_rate`, `zero_stage`,
    `offload`, `lora_*` are the actor's; `micro_batch_size` is the update mini-batch."""
    output_dir: str = _opt("output/step3_ppo", "where checkpoints, the final models and logs are written")
    reward_model: Optional[str] = _opt(None, "the step-2 reward model dir (required)")
    critic_model: Optional[str] = _opt(None, "critic init; unset = the reward model (PPO only)")
    ref_model: Optional[str] = _opt(None, "frozen reference policy; unset = the actor's initial weights")
    algo: str = _opt("ppo", "ppo (critic + GAE), grpo (group-normalised) or rloo (leave-one-out)",
                     choices=("ppo", "grpo", "rloo"))
    rollout_batch_size: int = _opt(16, "prompts per PPO step per process")
    group_size: int = _opt(1, "answers sampled per prompt (>= 2 for grpo/rloo)")
    ppo_epochs: int = _opt(1, "passes over each rollout batch")
    micro_batch_size: int = _opt(8, "answers per update mini-batch (one optimizer step each)")
    learning_rate: float = _opt(1e-5, "actor peak learning rate")
    lr_scheduler: str = _opt("constant", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    critic_learning_rate: float = _opt(5e-5, "critic peak learning rate")
    critic_warmup_steps: int = _opt(0, "critic linear warmup (optimizer steps)")
    critic_zero_stage: int = _opt(0, "critic DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    critic_offload: str = _opt("none", "critic optimizer/param offload", choices=("none", "cpu"))
    frozen_zero_stage: int = _opt(0, "reference/reward models: 3 partitions them, else full copies",
                                  choices=(0, 3))
    max_new_tokens: Optional[int] = _opt(None, "answer length cap; unset = data.max_answer_len")
    temperature: float = _opt(1.0, "sampling temperature of rollouts (> 0)")
    top_p: float = _opt(1.0, "nucleus sampling of rollouts")
    top_k: int = _opt(0, "top-k sampling of rollouts (0 = off)")
    min_new_tokens: int = _opt(0, "suppress EOS for this many answer tokens (benchmarks force full length)")
    clip_eps: float = _opt(0.2, "policy ratio clip")
    value_clip: float = _opt(0.2, "value clip around the rollout values (0 = off)")
    value_loss_coef: float = _opt(1.0, "critic loss weight")
    gamma: float = _opt(1.0, "discount")
    lam: float = _opt(0.95, "GAE lambda")
    kl_coef: float = _opt(0.05, "KL penalty coefficient (initial value when adaptive)")
    kl_estimator: str = _opt("k1", "per-token KL estimator", choices=M.KL_ESTIMATORS)
    adaptive_kl: bool = _opt(False, "adapt kl_coef toward target_kl")
    target_kl: float = _opt(1.0, "adaptive controller's target (summed per-answer KL)")
    kl_horizon: int = _opt(10000, "adaptive controller's horizon (answers)")
    kl_in_reward: Optional[bool] = _opt(None, "KL as a reward penalty (ppo/rloo) or a loss term (grpo); "
                                        "unset = the algorithm's usual choice")
    reward_clip: float = _opt(5.0, "clip reward-model scores to +-c (0 = off)")
    normalize_reward: bool = _opt(False, "normalise scores by running mean/std before clipping")
    whiten_advantages: Optional[bool] = _opt(None, "whiten advantages per batch; unset = on for ppo only")
    ptx_coef: float = _opt(0.0, "PPO-ptx: weight of the SFT loss mixed into the actor update (0 = off)")
    ema_decay: float = _opt(0.0, "keep an EMA copy of the actor with this decay (0 = off)")
    generation_fallback: Optional[str] = _opt(None, "hybrid engine fallback ('hf' = plain HF generate)",
                                              choices=(None, "hf"))
    eval_prompts: int = _opt(64, "held-out prompts scored before and after training")
    max_nonfinite_steps: int = _opt(3, "stop when this many consecutive steps had a NaN/inf loss")
    cpu_threads: int = _opt(0, "torch CPU threads (0 = torch's default); tiny models on a busy CPU run far "
                            "faster with 1 (no OpenMP oversubscription)")
    reward_tokenizer: str = _opt("check", "actor vs reward tokenizer: 'check' (must match) or "
                                 "'retokenize' (decode and re-encode for the reward model)",
                                 choices=("check", "retokenize"))

    def validate(self) -> None:
        super().validate()
        if not self.reward_model:
            raise ConfigError("PPO needs the step-2 reward model: pass --reward_model DIR")
        if self.algo in ("grpo", "rloo") and self.group_size < 2:
            raise ConfigError(f"{self.algo} compares answers to the same prompt: set --group_size >= 2")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0: PPO rollouts are sampled, not greedy")
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        n = self.rollout_batch_size * self.group_size
        if n % self.micro_batch_size:
            raise ConfigError(f"rollout_batch_size x group_size = {n} answers do not split into mini-batches "
                              f"of micro_batch_size={self.micro_batch_size}; make it a divisor of {n}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")

    def advantage_settings(self) -> AdvantageSettings:
        kl_in_reward = self.algo != "grpo" if self.kl_in_reward is None else self.kl_in_reward
        whiten = self.algo == "ppo" if self.whiten_advantages is None else self.whiten_advantages
        return AdvantageSettings(algo=self.algo, kl_estimator=self.kl_estimator,
                                 reward_clip=self.reward_clip or None, gamma=self.gamma, lam=self.lam,
                                 whiten_advantages=whiten, group_size=self.group_size,
                                 kl_in_reward=kl_in_reward)


# PPO defaults for the bundled tiny task (applied by the CLI when no model is given): sized so
# step 3 takes a few minutes on a 2-core CPU and clearly raises both the reward-model and the
# ground-truth score of held-out prompts. Answers of the task are at most 24 tokens + EOS.
# kl_coef 0.2 keeps the policy a few nats from the SFT model (held-out KL ~4 vs 12-15 at 0.05,
# where the reward model was exploited and the ground truth barely moved); the ground truth
# rises late (steps ~120-300), hence 300 steps. Tuned 2026-11-26 over kl_coef 0.05-0.2,
# adaptive KL, ppo_epochs 2/3, 200/300 steps and two seeds.
DEFAULT_TASK_PROFILE: Dict[str, Any] = {
    "rollout_batch_size": 32, "micro_batch_size": 16, "ppo_epochs": 2, "max_steps": 300,
    "learning_rate": 3e-4, "critic_learning_rate": 1e-3, "critic_warmup_steps": 4,
    "max_new_tokens": 28, "temperature": 1.0, "kl_coef": 0.2, "reward_clip": 5.0,
    "eval_prompts": 128, "weight_decay": 0.0, "save_steps": 50, "log_steps": 1, "cpu_threads": 1,
}


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return f


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs the same function at rollout and update time (and bit-equal resume), so every
    dropout is switched off, including the functional ones HF reads from attributes."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout", "attn_dropout",
                     "resid_dropout", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def max_positions(config) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_same_tokenizer(actor_tok, reward_tok, actor_path: str, reward_path: str) -> None:
    if actor_tok.get_vocab() != reward_tok.get_vocab() or actor_tok.eos_token_id != reward_tok.eos_token_id:
        raise ValueError(
            f"the actor ({actor_path}) and the reward model ({reward_path}) use different tokenizers "
            f"(vocab sizes {len(actor_tok)} vs {len(reward_tok)}); the reward model would score the wrong "
            "tokens. Train the reward model from the same base tokenizer, or pass --reward_tokenizer "
            "retokenize to decode answers and re-encode them for the reward model")


class PromptStream:
    """Deterministic, resumable order over the prompt dataset: one permutation per epoch from
    (seed, epoch); the position is the whole state. Each rank takes its slice of a batch."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int):
        if n < batch * world:
            raise ValueError(f"only {n} training prompts, fewer than one PPO batch "
                             f"(rollout_batch_size {batch} x {world} processes); lower --rollout_batch_size")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.pos = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch * self.world)

    def next_indices(self) -> List[int]:
        span = self.batch * self.world
        if self.pos + span > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[self.pos:self.pos + span]
        self.pos += span
        return perm[self.rank * self.batch:(self.rank + 1) * self.batch].tolist()

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]


class EMA:
    """Exponential moving average of the actor's full weights, kept in fp32 on the CPU
    (gathered from ZeRO-3 partitions when needed)."""

    def __init__(self, module: torch.nn.Module, decay: float, zero3: bool):
        self.decay, self.zero3 = decay, zero3
        with _gathered(module, zero3):
            self.shadow = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        with _gathered(module, self.zero3):
            for n, p in module.named_parameters():
                self.shadow[n].mul_(self.decay).add_(p.detach().float().cpu(), alpha=1 - self.decay)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, s):
        self.shadow = {k: v.clone() for k, v in s.items()}


def _gathered(module, zero3: bool):
    import contextlib
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PPOTrainer:
    """Construct with a validated PPOConfig; `train()` runs, `evaluate(prompts)` scores.

    Models may be injected (tests, custom setups) with `models={"actor": ..., "ref": ...,
    "reward": ..., "critic": ...}` and `tokenizer=`; anything not given is loaded from cfg."""

    def __init__(self, cfg: PPOConfig, *, models: Optional[Dict[str, torch.nn.Module]] = None,
                 tokenizer=None, prompts: Optional[List[Dict[str, Any]]] = None,
                 eval_prompts: Optional[List[Dict[str, Any]]] = None, ptx_data=None):
        cfg.validate()
        self.cfg = cfg
        from ..utils.logging import quiet_libraries
        quiet_libraries()
        if cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        self.device = init_distributed()
        self.rank, self.world = get_rank(), get_world_size()
        _seed_all(cfg.seed)
        if is_rank0():
            from ..config import save_config
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "training_config.yaml"))
        models = dict(models or {})
        from ..models.loading import load_tokenizer
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model_name_or_path, padding_side="left")
        self.reward_tokenizer = None
        if "reward" not in models:
            reward_tok = load_tokenizer(cfg.reward_model)
            if cfg.reward_tokenizer == "retokenize":
                self.reward_tokenizer = reward_tok
            else:
                check_same_tokenizer(self.tokenizer, reward_tok, str(cfg.model_name_or_path), cfg.reward_model)
        self.max_new_tokens = cfg.max_new_tokens or cfg.data.max_answer_len
        if prompts is None or eval_prompts is None:
            train_p, eval_p = self._load_prompts()
            prompts = train_p if prompts is None else prompts
            eval_prompts = eval_p if eval_prompts is None else eval_prompts
        self.prompts, self.eval_prompt_items = prompts, eval_prompts
        self.ptx_data = ptx_data if ptx_data is not None else (self._load_ptx() if cfg.ptx_coef > 0 else None)
        self.stream = PromptStream(len(prompts), cfg.rollout_batch_size, cfg.seed, self.rank, self.world)
        self.total_steps = cfg.max_steps or cfg.num_epochs * self.stream.steps_per_epoch
        self.updates_per_step = cfg.ppo_epochs * (cfg.rollout_batch_size * cfg.group_size // cfg.micro_batch_size)

        self._check_lengths(models)
        self._build_models(models)
        self.kl_ctl = (M.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else M.FixedKLController(cfg.kl_coef))
        self.reward_stats = M.RunningMoments()
        self.ema = EMA(self.actor.module, cfg.ema_decay, cfg.zero_stage == 3) if cfg.ema_decay > 0 else None
        from ..hybrid_engine import EngineConfig, HybridEngine
        # the bare module: the engine finds ZeRO-3 partitions on its parameters either way, and a
        # DeepSpeedEngine's own `.config` (its JSON) would shadow the HF config it looks for
        self.engine = HybridEngine(self.actor.module, self.tokenizer, EngineConfig(fallback=cfg.generation_fallback))
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + self.rank)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.history: List[Dict[str, float]] = []
        self._stop_signal: Optional[int] = None
        self.gt_score = self._ground_truth_fn()
        self._maybe_resume()

    # ------------------------------------------------------------------ setup

    def _load_prompts(self):
        from ..data import build_datasets
        train, eval_ = build_datasets(self.cfg.data, self.tokenizer, 3)
        return [train[i] for i in range(len(train))], [eval_[i] for i in range(len(eval_))]

    def _load_ptx(self):
        from ..data import build_datasets
        return build_datasets(self.cfg.data, self.tokenizer, 1)[0]

    def _ground_truth_fn(self):
        """The exact scorer of the bundled task, when that is the data being trained on."""
        if getattr(self.cfg.data, "paths", None):
            return None
        try:
            from ..data.default_task import ground_truth_score
        except ImportError:
            return None
        return ground_truth_score

    def _ds_config(self, zero_stage: int, offload: str, **over) -> Dict[str, Any]:
        c = dataclasses.replace(self.cfg, zero_stage=zero_stage, offload=offload, global_batch_size=None,
                                deepspeed_config=None, **over)
        return build_ds_config(c, self.world)

    def _optimizer(self, module, lr: float):
        decay, no_decay = [], []
        for n, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "norm" in n.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(self.cfg.adam_betas))

    def _trainable_engine(self, module, lr: float, warmup: int, zero_stage: int, offload: str):
        import deepspeed
        ds = self._ds_config(zero_stage, offload)
        opt = self._optimizer(module, lr)
        total = max(1, self.total_steps * self.updates_per_step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg.lr_scheduler, warmup, total))
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds)
        return engine

    def _frozen(self, module):
        module.requires_grad_(False)
        module.eval()
        if self.cfg.frozen_zero_stage == 3:
            import deepspeed
            ds = self._ds_config(3, "none")
            ds.pop("gradient_clipping", None)
            engine, *_ = deepspeed.initialize(model=module, config=ds)
            engine.eval()
            return engine
        return module.to(self.device)

    def _build_models(self, models):
        from ..models.loading import apply_lora_from_config, load_causal_lm
        cfg = self.cfg
        actor_ds = self._ds_config(cfg.zero_stage, cfg.offload)
        actor = models.get("actor") or load_causal_lm(cfg.model_name_or_path, tokenizer=self.tokenizer,
                                                     dtype=cfg.dtype, seed=cfg.seed, ds_config=actor_ds)
        ref = models.get("ref") or load_causal_lm(cfg.ref_model or cfg.model_name_or_path, tokenizer=self.tokenizer,
                                                 dtype=cfg.dtype, seed=cfg.seed)
        apply_lora_from_config(actor, cfg)
        if cfg.gradient_checkpointing:
            from ..models.loading import enable_gradient_checkpointing
            enable_gradient_checkpointing(actor)
        disable_dropout(actor)
        self.actor = self._trainable_engine(actor, cfg.learning_rate, cfg.warmup_steps, cfg.zero_stage, cfg.offload)
        self.ref = self._frozen(ref)
        reward = models.get("reward")
        critic = models.get("critic")
        if reward is None or (critic is None and cfg.algo == "ppo"):
            from ..models.reward import RewardModel
            kw = dict(tokenizer=self.tokenizer, dtype=cfg.dtype, seed=cfg.seed)
            if reward is None:
                reward = RewardModel.from_pretrained(cfg.reward_model, **kw)
            if critic is None and cfg.algo == "ppo":
                critic = RewardModel.from_pretrained(cfg.critic_model or cfg.reward_model, **kw,
                                                     ds_config=self._ds_config(cfg.critic_zero_stage, cfg.critic_offload))
        self.reward = self._frozen(reward)
        self.critic = None
        if cfg.algo == "ppo":
            disable_dropout(critic)
            self.critic = self._trainable_engine(critic, cfg.critic_learning_rate, cfg.critic_warmup_steps,
                                                 cfg.critic_zero_stage, cfg.critic_offload)

    def _check_lengths(self, models):
        """Prompt + answer must fit every model's positions: checked from the configs, before
        any model is loaded or any token generated."""
        from transformers import AutoConfig
        from ..models.loading import resolve_model_path
        cfg = self.cfg
        longest = max(len(p["prompt_input_ids"]) for p in self.prompts + self.eval_prompt_items)
        need = longest + self.max_new_tokens
        for name, key, path in (("actor", "actor", cfg.model_name_or_path), ("reward model", "reward", cfg.reward_model)):
            conf = getattr(_unwrap(models[key]), "config", None) if key in models else \
                AutoConfig.from_pretrained(resolve_model_path(path))
            limit = max_positions(conf)
            if limit is not None and need > limit:
                raise ValueError(
                    f"prompt ({longest} tokens) + answer ({self.max_new_tokens} tokens) = {need} exceeds the "
                    f"{name}'s {limit} positions; lower --data.max_prompt_len or --max_new_tokens")

    # ------------------------------------------------------------------ rollouts

    def _collate(self, items: List[Dict[str, Any]]):
        pad = self.tokenizer.pad_token_id
        width = max(len(it["prompt_input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):  # left padding: the answer starts in the same column
            p = torch.as_tensor(it["prompt_input_ids"], dtype=torch.long)
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device), [it.get("prompt", "") for it in items]

    @torch.no_grad()
    def generate(self, input_ids, attention_mask):
        cfg = self.cfg
        out = self.engine.generate(input_ids, attention_mask, max_new_tokens=self.max_new_tokens, do_sample=True,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   min_new_tokens=cfg.min_new_tokens,
                                   eos_token_id=self.tokenizer.eos_token_id,
                                   pad_token_id=self.tokenizer.pad_token_id, generator=self.gen)
        return out.sequences

    def _score(self, sequences, attention_mask, prompt_len):
        if self.reward_tokenizer is None:
            return sequence_scores(self.reward, sequences, attention_mask)
        texts = [self.tokenizer.decode(s[m.bool()], skip_special_tokens=True)
                 for s, m in zip(sequences, attention_mask)]
        self.reward_tokenizer.padding_side = "right"
        enc = self.reward_tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        return sequence_scores(self.reward, enc["input_ids"], enc["attention_mask"])

    def _answers_text(self, sequences, action_mask, prompt_len) -> List[str]:
        return [self.tokenizer.decode(s[prompt_len:][m.bool()], skip_special_tokens=True)
                for s, m in zip(sequences, action_mask)]

    @torch.no_grad()
    def make_experience(self, items: List[Dict[str, Any]]) -> Experience:
        cfg = self.cfg
        if cfg.group_size > 1:
            items = [it for it in items for _ in range(cfg.group_size)]  # the n samples adjacent
        input_ids, prompt_mask, prompts = self._collate(items)
        clock = self._clock()
        sequences = self.generate(input_ids, prompt_mask)
        gen_time = clock()
        P = input_ids.shape[1]
        action_mask = M.answer_mask(sequences[:, P:], self.tokenizer.eos_token_id)
        attention_mask = torch.cat([prompt_mask.float(), action_mask], 1).long()
        self.actor.eval()
        clock()
        old_logp = answer_logprobs(self.actor, sequences, attention_mask, P)
        times = {"time_actor_forward": clock()}
        ref_logp = answer_logprobs(self.ref, sequences, attention_mask, P)
        times["time_ref_forward"] = clock()
        scores = self._score(sequences, attention_mask, P)
        times["time_reward_forward"] = clock()
        values = answer_values(self.critic, sequences, attention_mask, P) if self.critic is not None else None
        if values is not None:
            times["time_critic_forward"] = clock()
        fwd_time = sum(times.values())
        raw_scores = scores.clone()
        if cfg.normalize_reward:
            self.reward_stats.update(_gather_all(scores))
            scores = self.reward_stats.normalize(scores)
        adv, returns, stats = compute_advantages(cfg.advantage_settings(), scores, action_mask, old_logp,
                                                 ref_logp, values, self.kl_ctl.value)
        n_tokens = action_mask.sum().item()
        info = {"reward_mean": raw_scores.mean().item(), "reward_std": raw_scores.std().item() if len(raw_scores) > 1
                else 0.0, "kl": stats["kl"], "kl_coef": self.kl_ctl.value,
                "answer_len": action_mask.sum(1).mean().item(), "gen_time": gen_time, "forward_time": fwd_time,
                "gen_tokens_per_s": n_tokens / max(gen_time, 1e-9), **times}
        if self.gt_score is not None:
            answers = self._answers_text(sequences, action_mask, P)
            info["gt_score"] = float(np.mean([self.gt_score(p, a) for p, a in zip(prompts, answers)]))
        return Experience(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                          old_logprobs=old_logp, ref_logprobs=ref_logp, advantages=adv, scores=raw_scores,
                          prompt_len=P, old_values=values, returns=returns, info=info)

    # ------------------------------------------------------------------ update

    def _clock(self):
        """Seconds since the previous call (device work finished first, so GPU times are real)."""
        last = [time.perf_counter()]

        def lap() -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            dt, last[0] = now - last[0], now
            return dt
        return lap

    def _all_finite(self, *tensors) -> bool:
        """Agreed over ranks: every rank skips the step together (ZeRO collectives stay in step)."""
        bad = torch.tensor([0.0 if all(torch.isfinite(t).all() for t in tensors) else 1.0], device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _ptx_loss(self):
        batch = self._next_ptx_batch()
        out = self.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False)
        return out.loss

    def _next_ptx_batch(self):
        from ..data.collators import SFTCollator
        if not hasattr(self, "_ptx_order"):
            self._ptx_order, self._ptx_pos = [], 0
            self._ptx_collate = SFTCollator(self.tokenizer.pad_token_id)
        n = self.cfg.micro_batch_size
        if self._ptx_pos + n > len(self._ptx_order):
            g = torch.Generator().manual_seed(self.cfg.seed + self.step)
            self._ptx_order, self._ptx_pos = torch.randperm(len(self.ptx_data), generator=g).tolist(), 0
        idx = self._ptx_order[self._ptx_pos:self._ptx_pos + n]
        self._ptx_pos += n
        batch = self._ptx_collate([self.ptx_data[i] for i in idx])
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def update(self, exp: Experience) -> Dict[str, float]:
        cfg = self.cfg
        sums: Dict[str, float] = {}
        count, skipped = 0, 0
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        g = torch.Generator().manual_seed(cfg.seed * 31 + self.step)
        clock, t_actor, t_critic = self._clock(), 0.0, 0.0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp), generator=g)
            for mb_idx in order.split(cfg.micro_batch_size):
                mb = exp.select(mb_idx.to(exp.sequences.device))
                clock()
                stats = self._actor_step(mb)
                t_actor += clock()
                if self.critic is not None and stats is not None:
                    cstats = self._critic_step(mb)
                    t_critic += clock()
                    stats = None if cstats is None else {**stats, **cstats}
                if stats is None:
                    skipped += 1
                    continue
                count += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["skipped_updates"] = float(skipped)
        out["time_actor_train"], out["time_critic_train"] = t_actor, t_critic
        return out

    def _actor_step(self, mb: Experience) -> Optional[Dict[str, float]]:
        cfg = self.cfg
        logp, entropy = answer_logprobs(self.actor, mb.sequences, mb.attention_mask, mb.prompt_len, with_entropy=True)
        loss, st = M.clipped_policy_loss(logp, mb.old_logprobs, mb.advantages, mb.action_mask, cfg.clip_eps)
        stats = {"policy_loss": loss.item(), "policy_clipfrac": st["policy_clipfrac"].item(),
                 "approx_kl": st["approx_kl"].item(),
                 "entropy": M.masked_mean(entropy.detach(), mb.action_mask).item()}
        if not cfg.advantage_settings().kl_in_reward and self.kl_ctl.value > 0:
            kl_loss = M.masked_mean(M.kl_estimate(logp, mb.ref_logprobs, "k3"), mb.action_mask)
            loss = loss + self.kl_ctl.value * kl_loss
            stats["kl_loss"] = kl_loss.item()
        if cfg.ptx_coef > 0 and self.ptx_data is not None:
            ptx = self._ptx_loss()
            loss = loss + cfg.ptx_coef * ptx
            stats["ptx_loss"] = ptx.item()
        if not self._all_finite(loss.detach()):
            return None
        self.actor.backward(loss)
        self.actor.step()
        return stats

    def _critic_step(self, mb: Experience) -> Optional[Dict[str, float]]:
        cfg = self.cfg
        values = answer_values(self.critic, mb.sequences, mb.attention_mask, mb.prompt_len)
        loss, st = M.clipped_value_loss(values, mb.old_values, mb.returns, mb.action_mask, cfg.value_clip)
        if not self._all_finite(loss.detach()):
            return None
        self.critic.backward(cfg.value_loss_coef * loss)
        self.critic.step()
        err = M.masked_mean((values.detach() - mb.returns) ** 2, mb.action_mask)
        return {"value_loss": loss.item(), "value_clipfrac": st["value_clipfrac"].item(), "value_error": err.item()}

    # ------------------------------------------------------------------ loop

    def train_step(self) -> Dict[str, float]:
        """One PPO step: rollouts on the next prompts, then the update. Returns its metrics."""
        t0 = time.perf_counter()
        items = [self.prompts[i] for i in self.stream.next_indices()]
        exp = self.make_experience(items)
        t1 = time.perf_counter()
        finite = self._all_finite(exp.advantages, exp.scores, exp.old_logprobs, exp.ref_logprobs,
                                  *([exp.returns] if exp.returns is not None else []))
        metrics = dict(exp.info)
        if finite:
            metrics.update(self.update(exp))
        else:
            metrics["skipped_updates"] = float(self.updates_per_step)
        t2 = time.perf_counter()
        if metrics["skipped_updates"] >= self.updates_per_step:  # nothing was learned this step
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} consecutive PPO steps had NaN/inf losses or rewards (step {self.step + 1}); "
                    "the run is diverging: lower --learning_rate, raise --kl_coef, set --reward_clip, or use fp32/bf16 "
                    "instead of fp16")
        else:
            self.nonfinite_streak = 0
        # the controller sees the all-rank KL, so every rank keeps the same coefficient
        self.kl_ctl.update(_mean_over_ranks(metrics["kl"], self.device, self.world), len(exp) * self.world)
        if self.ema is not None:
            self.ema.update(self.actor.module)
        self.step += 1
        n_tokens = exp.attention_mask.sum().item() * self.world
        metrics.update(train_time=t2 - t1, step_time=t2 - t0, tokens_per_s=n_tokens / max(t2 - t0, 1e-9),
                       nonfinite_steps=float(self.nonfinite_total))
        metrics = {k: _mean_over_ranks(v, self.device, self.world) for k, v in sorted(metrics.items())}
        self.history.append({"step": self.step, **metrics})
        return metrics

    def train(self) -> List[Dict[str, float]]:
        cfg = self.cfg
        logger = MetricsLogger(cfg.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard"))
        bar = progress_bar(self.total_steps, desc=f"step 3 ({cfg.algo})", initial=self.step)
        old_handlers = self._install_signal_handlers()
        try:
            while self.step < self.total_steps:
                m = self.train_step()
                logger.log(m, self.step)
                bar.update(1)
                bar.set_postfix({k: f"{m[k]:.3g}" for k in ("reward_mean", "gt_score", "kl", "value_error")
                                 if k in m})
                if self._stop_signal is not None:
                    path = self.save_checkpoint()
                    print_rank0(f"signal {self._stop_signal}: checkpoint saved to {path} at step {self.step}; exiting")
                    raise SystemExit(128 + self._stop_signal)
                if cfg.save_steps and (self.step % cfg.save_steps == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        finally:
            bar.close()
            logger.close()
            self._restore_signal_handlers(old_handlers)
        if is_rank0() and self.history:
            from .plots import plot_ppo_history
            plot_ppo_history(self.history, os.path.join(cfg.output_dir, "ppo_curves.png"))
        return self.history

    def _install_signal_handlers(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop_signal = signum  # acted on at the end of the current step

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(old):
        for s, h in (old or {}).items():
            signal.signal(s, h)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, items: Optional[List[Dict[str, Any]]] = None, seed: int = 0) -> Dict[str, float]:
        """Mean reward-model score, ground-truth score (bundled task) and summed KL to the
        reference of sampled answers to held-out prompts (fixed sampling seed)."""
        items = items if items is not None else self.eval_prompt_items[:self.cfg.eval_prompts]
        # equal batch counts on every rank (ZeRO-3 forwards are collective); filler rows weigh 0
        per_rank = -(-len(items) // self.world)
        mine = items[self.rank::self.world]
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        items = mine + items[:1] * (per_rank - len(mine))
        saved_gen = self.gen
        self.gen = torch.Generator(device=self.device).manual_seed(10_000 + seed + self.rank)
        scores, kls, gts = [], [], []
        try:
            bs = self.cfg.rollout_batch_size
            for i in range(0, len(items), bs):
                chunk = items[i:i + bs]
                input_ids, prompt_mask, prompts = self._collate(chunk)
                seqs = self.generate(input_ids, prompt_mask)
                P = input_ids.shape[1]
                amask = M.answer_mask(seqs[:, P:], self.tokenizer.eos_token_id)
                att = torch.cat([prompt_mask.float(), amask], 1).long()
                self.actor.eval()
                logp = answer_logprobs(self.actor, seqs, att, P)
                ref = answer_logprobs(self.ref, seqs, att, P)
                kls.append((M.kl_estimate(logp, ref, "k1") * amask).sum(1))
                scores.append(self._score(seqs, att, P))
                if self.gt_score is not None:
                    answers = self._answers_text(seqs, amask, P)
                    gts.extend(self.gt_score(p, a) for p, a in zip(prompts, answers))
        finally:
            self.gen = saved_gen
        w = torch.tensor(weights, dtype=torch.float64)
        sums = [float((torch.cat(scores).double().cpu() * w).sum()) if scores else 0.0,
                float((torch.cat(kls).double().cpu() * w).sum()) if kls else 0.0,
                float((torch.tensor(gts, dtype=torch.float64) * w).sum()) if gts else 0.0, float(w.sum())]
        total = _sum_over_ranks(sums, self.device, self.world)
        n = total[3] if total[3] > 0 else float("nan")
        out = {"reward": total[0] / n, "kl_to_ref": total[1] / n}
        if self.gt_score is not None:
            out["gt_score"] = total[2] / n
        return out

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_root(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def save_checkpoint(self) -> str:
        path = os.path.join(self.checkpoint_root(), f"step_{self.step}")
        os.makedirs(path, exist_ok=True)
        self.actor.save_checkpoint(os.path.join(path, "actor"), tag="state")
        if self.critic is not None:
            self.critic.save_checkpoint(os.path.join(path, "critic"), tag="state")
        state = {"step": self.step, "stream": self.stream.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "reward_stats": self.reward_stats.state_dict(), "rng": rng_state(),
                 "gen": self.gen.get_state(), "nonfinite": (self.nonfinite_total, self.nonfinite_streak),
                 "history": self.history, "ptx": (getattr(self, "_ptx_order", None), getattr(self, "_ptx_pos", 0))}
        torch.save(state, os.path.join(path, f"trainer_state_rank{self.rank}.pt"))
        if self.ema is not None and is_rank0():
            torch.save(self.ema.state_dict(), os.path.join(path, "ema.pt"))
        barrier()
        if is_rank0():
            with open(os.path.join(path, "COMPLETE"), "w") as f:
                f.write(str(self.step))
            self._prune_checkpoints()
        barrier()
        return path

    def _prune_checkpoints(self):
        import shutil
        keep = self.cfg.save_total_limit
        done = sorted(_complete_checkpoints(self.checkpoint_root()), key=lambda p: int(p.rsplit("_", 1)[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self):
        cfg = self.cfg
        if cfg.resume == "no":
            return
        if cfg.resume == "auto":
            found = sorted(_complete_checkpoints(self.checkpoint_root()), key=lambda p: int(p.rsplit("_", 1)[1]))
            if not found:
                return
            path = found[-1]
        else:
            path = cfg.resume
        self.load_checkpoint(path)
        print_rank0(f"resumed step 3 from {path} (step {self.step})")

    def load_checkpoint(self, path: str) -> None:
        self.actor.load_checkpoint(os.path.join(path, "actor"), tag="state")
        if self.critic is not None:
            self.critic.load_checkpoint(os.path.join(path, "critic"), tag="state")
        state_file = os.path.join(path, f"trainer_state_rank{self.rank}.pt")
        if not os.path.isfile(state_file):
            raise ValueError(f"{path} has no {os.path.basename(state_file)}: it was saved with a different "
                             "number of processes; resume with the same world size")
        s = torch.load(state_file, weights_only=False)
        self.step = s["step"]
        self.stream.load_state_dict(s["stream"])
        self.kl_ctl.load_state_dict(s["kl_ctl"])
        self.reward_stats.load_state_dict(s["reward_stats"])
        set_rng_state(s["rng"])
        self.gen.set_state(s["gen"])
        self.nonfinite_total, self.nonfinite_streak = s["nonfinite"]
        self.history = s["history"]
        if s["ptx"][0] is not None:
            self._ptx_order, self._ptx_pos = s["ptx"]
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(os.path.join(path, "ema.pt"), weights_only=False))

    # ------------------------------------------------------------------ export

    def save_models(self, out_dir: Optional[str] = None) -> Dict[str, str]:
        """Final models in HF format: actor/ (LoRA merged when cfg.merge_lora_on_save), critic/,
        actor_ema/ when EMA is on; the tokenizer next to each."""
        from .checkpoint import lora_scalings, merge_lora_state_dict, save_hf_model, unwrap_peft
        out_dir = out_dir or self.cfg.output_dir
        paths = {"actor": os.path.join(out_dir, "actor")}
        save_hf_model(self.actor, paths["actor"], tokenizer=self.tokenizer, merge_lora=self.cfg.merge_lora_on_save)
        if self.critic is not None:
            paths["critic"] = os.path.join(out_dir, "critic")
            save_hf_model(self.critic, paths["critic"], tokenizer=self.tokenizer, merge_lora=True)
        if self.ema is not None:
            paths["actor_ema"] = os.path.join(out_dir, "actor_ema")
            if is_rank0():  # the shadow is a full fp32 copy on every rank; LoRA always merged
                module = self.actor.module
                dtype = next(iter(self.ema.shadow.values())).dtype
                sd = {k: v.to(dtype) for k, v in self.ema.shadow.items()}
                scalings = lora_scalings(module)
                sd = merge_lora_state_dict(sd, scalings) if scalings else sd
                unwrap_peft(module).save_pretrained(paths["actor_ema"], state_dict=sd)
                self.tokenizer.save_pretrained(paths["actor_ema"])
            barrier()
        return paths


def _unwrap(m):
    return getattr(m, "module", m)


def _gather_all(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _sum_over_ranks(values: List[float], device, world: int) -> List[float]:
    if world == 1 or not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _mean_over_ranks(v: float, device, world: int) -> float:
    if world == 1 or not dist.is_initialized():
        return float(v)
    t = torch.tensor([float(v)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def _complete_checkpoints(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in os.listdir(root)
            if d.startswith("step_") and os.path.isfile(os.path.join(root, d, "COMPLETE"))]


def format_eval_table(before: Dict[str, float], after: Dict[str, float]) -> str:
    rows = [("reward-model score", "reward"), ("ground-truth score", "gt_score"), ("KL to reference", "kl_to_ref")]
    lines = [f"{'held-out prompts':<22}{'before PPO':>12}{'after PPO':>12}"]
    for label, key in rows:
        if key in before:
            lines.append(f"{label:<22}{before[key]:>12.4f}{after[key]:>12.4f}")
    return "\n".join(lines)


def train_ppo(cfg: PPOConfig, **kwargs) -> Dict[str, Any]:
    """Run step 3 end to end: evaluate on held-out prompts, train (resuming when a checkpoint
    is there), evaluate again, print both, save the models. Returns paths and both evals."""
    import json
    trainer = PPOTrainer(cfg, **kwargs)
    before_file = os.path.join(cfg.output_dir, "eval_before.json")
    if trainer.step > 0 and os.path.isfile(before_file):  # resumed: the "before" is the original one
        with open(before_file) as f:
            before = json.load(f)
    else:
        before = trainer.evaluate()
        if is_rank0():
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(before_file, "w") as f:
                json.dump(before, f, indent=1)
    trainer.train()
    after = trainer.evaluate()
    n_eval = min(cfg.eval_prompts, len(trainer.eval_prompt_items))
    print_rank0(f"step 3 ({cfg.algo}) on {n_eval} held-out prompts:\n{format_eval_table(before, after)}")
    paths = trainer.save_models()
    if is_rank0():
        with open(os.path.join(cfg.output_dir, "eval_before_after.json"), "w") as f:
            json.dump({"before": before, "after": after}, f, indent=1)
    return {"paths": paths, "before": before, "after": after, "history": trainer.history, "trainer": trainer}
