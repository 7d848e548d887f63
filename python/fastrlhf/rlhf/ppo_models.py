"""Step 3's models, built once per run: the actor and critic as trained DeepSpeed engines (each
with its own ZeRO stage, offload, learning rate and warmup), the frozen reference (only with
kl_coef > 0: nothing else reads it) and reward models (ZeRO-3 partitioned with
`frozen_zero_stage 3`, else plain modules), and the actor's EMA.
Dropout is off in everything trained, so a rollout's log-probs and values are the function the
update differentiates.

The checks that need only configs and tokenizers (same tokenizer for actor and reward model,
prompt + answer within every model's positions) run before any weights load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..models.loading import (apply_lora_from_config, disable_dropout, enable_gradient_checkpointing, load_causal_lm,
                              load_tokenizer, max_positions)
from ..models.paths import resolve_model_path
from ..models.reward import RewardModel
from .ds_engine import TrainedEngine, ds_config_for, frozen_engine, gathered_parameters, initialize_engine
from .run_setup import RunContext, training_dtype


class EMA:
    """Exponential moving average of the actor's full weights, kept in fp32 on the CPU
    (gathered from ZeRO-3 partitions when needed)."""

    def __init__(self, module: nn.Module, decay: float, zero3: bool):
        self.decay, self.zero3 = decay, zero3
        with gathered_parameters(module, zero3):
            self.shadow = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with gathered_parameters(module, self.zero3):
            for n, p in module.named_parameters():
                self.shadow[n].mul_(self.decay).add_(p.detach().float().cpu(), alpha=1 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


@dataclass
class PPOModels:
    actor: TrainedEngine
    ref: Any                       # frozen: a module, or a ZeRO-3 inference engine; None with kl_coef 0
    reward: Any                    # frozen RewardModel (or engine); None when rewards come from functions/servers only
    critic: Optional[TrainedEngine] = None  # over a RewardModel (algorithms that need a critic)
    ema: Optional[EMA] = None
    reward_tokenizer: Any = None   # set when answers are re-encoded for the reward model


def check_same_tokenizer(actor_tok, reward_tok, actor_path: str, reward_path: str) -> None:
    if actor_tok.get_vocab() != reward_tok.get_vocab() or actor_tok.eos_token_id != reward_tok.eos_token_id:
        raise ConfigError(
            f"the actor ({actor_path}) and the reward model ({reward_path}) use different tokenizers "
            f"(vocab sizes {len(actor_tok)} vs {len(reward_tok)}); the reward model would score the wrong "
            "tokens. Train the reward model from the same base tokenizer, or pass --reward_tokenizer "
            "retokenize to decode answers and re-encode them for the reward model")


def reward_tokenizer_for(cfg, actor_tokenizer):
    """None when the reward model reads the actor's tokens as they are (checked) or there is no
    reward model, else its own tokenizer (reward_tokenizer='retokenize')."""
    if not cfg.reward_model:
        return None
    reward_tok = load_tokenizer(cfg.reward_model)
    if cfg.reward_tokenizer == "retokenize":
        return reward_tok
    check_same_tokenizer(actor_tokenizer, reward_tok, str(cfg.model_name_or_path), cfg.reward_model)
    return None


def check_lengths(cfg, given: Dict[str, nn.Module], longest_prompt: int, max_new_tokens: int) -> None:
    """Prompt + answer must fit the actor's and the reward model's positions: checked from the
    configs, before any model is loaded or any token generated."""
    from transformers import AutoConfig
    need = longest_prompt + max_new_tokens
    for name, key, path in (("actor", "actor", cfg.model_name_or_path), ("reward model", "reward", cfg.reward_model)):
        if key not in given and key == "reward" and not path:
            continue  # no reward model: rewards come from functions or servers
        if key in given:
            conf = getattr(getattr(given[key], "module", given[key]), "config", None)
        else:
            conf = AutoConfig.from_pretrained(resolve_model_path(path))
        limit = max_positions(conf)
        if limit is not None and need > limit:
            raise ConfigError(
                f"prompt ({longest_prompt} tokens) + answer ({max_new_tokens} tokens) = {need} exceeds the "
                f"{name}'s {limit} positions; lower --data.max_prompt_len or --max_new_tokens")


def check_inference_tp(cfg, given: Dict[str, nn.Module], world_size: int) -> None:
    """--inference_tp_size against the actor's head counts, from its config (before any weights load)."""
    if cfg.inference_tp_size == 1:
        return
    from transformers import AutoConfig
    from ..hybrid_engine.tensor_parallel import check_tp_size
    if "actor" in given:
        conf = getattr(given["actor"], "module", given["actor"]).config
    else:
        conf = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path))
    try:
        check_tp_size(conf, cfg.inference_tp_size, world_size)
    except ValueError as e:
        raise ConfigError(f"--inference_tp_size: {e}") from None


def build_ppo_models(cfg, ctx: RunContext, tokenizer, optimizer_steps: int,
                     given: Optional[Dict[str, nn.Module]] = None, reward_tokenizer=None) -> PPOModels:
    """Load (or take from `given`: "actor", "ref", "reward", "critic") and wrap step 3's models.
    `optimizer_steps` is the length of the actor's and critic's learning-rate schedules."""
    given = dict(given or {})
    check_inference_tp(cfg, given, ctx.world_size)
    dtype = training_dtype(ctx)
    actor = given.get("actor") or load_causal_lm(cfg.model_name_or_path, tokenizer=tokenizer, dtype=dtype,
                                                 seed=cfg.seed, ds_config=ctx.ds_config)
    apply_lora_from_config(actor, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(actor)
    disable_dropout(actor)
    actor = initialize_engine(actor, cfg, ctx.ds_config, optimizer_steps)
    frozen_ds = ds_config_for(cfg, ctx.ds_config, ctx.world_size, 3, "none") if cfg.frozen_zero_stage == 3 else {}
    ref = None
    if cfg.kl_coef > 0:  # with kl_coef 0 (adaptive or not: it stays 0) nothing reads the reference
        ref = given.get("ref") or load_causal_lm(cfg.ref_model or cfg.model_name_or_path, tokenizer=tokenizer,
                                                 dtype=dtype, seed=cfg.seed)
        ref = frozen_engine(ref, frozen_ds, ctx.device)
    kw = dict(tokenizer=tokenizer, dtype=dtype, seed=cfg.seed)
    reward = given.get("reward") or (RewardModel.from_pretrained(cfg.reward_model, **kw) if cfg.reward_model else None)
    models = PPOModels(actor=actor, ref=ref,
                       reward=None if reward is None else frozen_engine(reward, frozen_ds, ctx.device),
                       reward_tokenizer=reward_tokenizer)
    if cfg.algorithm.needs_critic:
        critic_ds = ds_config_for(cfg, ctx.ds_config, ctx.world_size, cfg.critic_zero_stage, cfg.critic_offload)
        # no reward model: the critic starts from the actor's backbone with a fresh value head
        critic_init = cfg.critic_model or cfg.reward_model or cfg.model_name_or_path
        critic = given.get("critic") or RewardModel.from_pretrained(critic_init, **kw, ds_config=critic_ds)
        disable_dropout(critic)
        models.critic = initialize_engine(critic, cfg, critic_ds, optimizer_steps, lr=cfg.critic_learning_rate,
                                          warmup=cfg.critic_warmup_steps)
    if cfg.ema_decay > 0:
        models.ema = EMA(actor.module, cfg.ema_decay, actor.zero3)
    return models
