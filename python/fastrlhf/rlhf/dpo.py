"""DPO: the alternative to steps 2 + 3, straight from the preference pairs to a policy.

It shares the step loop (`common.run_training`), the answer log-prob code
(`experience.answer_logprobs` alignment) and the loss (`rl_math.dpo_loss`) with the rest of
fastrlhf; only the batch loss is new here.

The step-2 items carry prompt + answer without the prompt length, so the answer is taken to
start after the longest common prefix of the chosen and rejected rows. That is exact for the
loss: a token of the shared prefix has the same context in both rows, so its log-prob
appears in both sums and cancels in (chosen - rejected).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import ConfigError, TrainConfig, _opt
from ..utils.distributed import all_reduce_sum
from ..utils.logging import print_rank0
from . import rl_math as M
from .experience import policy_logits


@dataclass
class DPOConfig(TrainConfig):
    """DPO on the step-2 preference split; `model_name_or_path` is the SFT model (policy and,
    unless `ref_model` is set, the frozen reference)."""
    output_dir: str = _opt("output/step3_dpo", "where checkpoints, the final model and logs are written")
    ref_model: Optional[str] = _opt(None, "frozen reference policy; unset = the initial policy")
    beta: float = _opt(0.1, "DPO temperature: how far the policy may move from the reference")
    label_smoothing: float = _opt(0.0, "conservative DPO: assumed share of flipped preference labels")
    learning_rate: float = _opt(1e-4, "peak learning rate")
    eval_max_batches: Optional[int] = _opt(None, "cap on eval batches (unset = the whole eval split)")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def answer_mask_after_common_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[2B, S-1] mask over the predicted tokens (columns 1..S-1) that belong to the answers:
    real tokens at or after the first column where a chosen row and its rejected twin differ."""
    half = input_ids.shape[0] // 2
    chosen, rejected = input_ids[:half], input_ids[half:]
    differs = (chosen != rejected) | (attention_mask[:half] != attention_mask[half:])
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    big = torch.full_like(cols, input_ids.shape[1]).expand_as(chosen)
    first_diff = torch.where(differs, cols.expand_as(chosen), big).min(dim=1).values  # [B]
    start = first_diff.repeat(2)[:, None]
    mask = (cols[None, :] >= start) & attention_mask.bool()
    return mask[:, 1:].float()


def sequence_logprob_sums(model, input_ids, attention_mask, answer_mask) -> torch.Tensor:
    """Sum over answer tokens of log p(token | prefix) -> [rows]."""
    logits = policy_logits(model, input_ids, attention_mask)[:, :-1]
    logp = M.logprobs_from_logits(logits, input_ids[:, 1:])
    return (logp * answer_mask).sum(-1)


def dpo_batch_loss(engine, ref_model, batch: Dict[str, torch.Tensor], beta: float, label_smoothing: float
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DPO loss of a PairCollator batch (B chosen rows, then their B rejected twins)."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    amask = answer_mask_after_common_prefix(ids, att)
    half = ids.shape[0] // 2
    policy = sequence_logprob_sums(engine, ids, att, amask)
    with torch.no_grad():
        ref = sequence_logprob_sums(ref_model, ids, att, amask)
    return M.dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta, label_smoothing)


@torch.no_grad()
def evaluate_dpo(engine, ref_model, dataset, collate, cfg: DPOConfig, rank: int, world: int) -> Dict[str, float]:
    from .common import eval_batches, to_device
    was_training = engine.training
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, accuracy, margin, pairs (weighted)
    bs = cfg.eval_batch_size or cfg.micro_batch_size
    for batch, weight in eval_batches(dataset, collate, bs, rank, world, cfg.eval_max_batches):
        batch = to_device(batch, engine.device)
        loss, st = dpo_batch_loss(engine, ref_model, batch, cfg.beta, cfg.label_smoothing)
        n = batch["input_ids"].shape[0] // 2
        sums += weight * n * torch.tensor([loss.item(), st["reward_accuracy"].item(), st["reward_margin"].item(), 1.0],
                                          dtype=torch.float64)
    sums = all_reduce_sum(sums)
    if was_training:
        engine.train()
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "reward_accuracy": sums[1].item() / n, "reward_margin": sums[2].item() / n}


def train_dpo(cfg: DPOConfig, *, tokenizer=None, datasets: Optional[Tuple[Any, Any]] = None) -> Dict[str, Any]:
    """Train the policy with DPO and save it (HF format) to cfg.output_dir."""
    from ..data.collators import PairCollator
    from ..models.loading import apply_lora_from_config, load_causal_lm, load_tokenizer
    from . import checkpoint as ckpt_lib
    from .common import (GlobalBatchSampler, describe_run, initialize_engine, run_training, setup_run,
                         total_train_steps, training_dtype)
    from .ppo import disable_dropout
    cfg.validate()
    ctx = setup_run(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model_name_or_path)
    if datasets is None:
        from ..data import build_datasets
        datasets = build_datasets(cfg.data, tokenizer, 2)
    train_ds, eval_ds = datasets
    collate = PairCollator(tokenizer.pad_token_id)
    dtype = training_dtype(ctx)
    model = load_causal_lm(cfg.model_name_or_path, tokenizer=tokenizer, dtype=dtype, seed=cfg.seed,
                           ds_config=ctx.ds_config)
    apply_lora_from_config(model, cfg)
    disable_dropout(model)  # the policy and reference must score identically at step 0
    ref = load_causal_lm(cfg.ref_model or cfg.model_name_or_path, tokenizer=tokenizer, dtype=dtype,
                         seed=cfg.seed).to(ctx.device).eval().requires_grad_(False)
    sampler = GlobalBatchSampler(len(train_ds), ctx.micro_batch_size, ctx.accumulation, ctx.world_size,
                                 ctx.rank, cfg.seed)
    total = total_train_steps(cfg, sampler.steps_per_epoch)
    describe_run(ctx, model, len(train_ds), len(eval_ds), total)
    engine = initialize_engine(model, cfg, ctx, total)

    def loss_fn(eng, batch):
        return dpo_batch_loss(eng, ref, batch, cfg.beta, cfg.label_smoothing)[0]

    def evaluate():
        return evaluate_dpo(engine, ref, eval_ds, collate, cfg, ctx.rank, ctx.world_size)

    before = evaluate()
    result = run_training(engine=engine, ctx=ctx, train_dataset=train_ds, collate=collate, loss_fn=loss_fn,
                          evaluate=evaluate, sampler=sampler, total_steps=total, tokenizer=tokenizer, desc="DPO")
    after = evaluate()
    ctx.metrics.log({f"eval/{k}": v for k, v in after.items()}, result["step"])
    ctx.metrics.close()
    print_rank0("DPO held-out pairs: " + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before))
    ckpt_lib.save_hf_model(engine, cfg.output_dir, tokenizer=tokenizer, merge_lora=cfg.merge_lora_on_save)
    return {"eval_before": before, "eval_after": after, "losses": result["losses"], "engine": engine}
