"""DPO: the alternative to steps 2 + 3, straight from the preference pairs to a policy.

It runs on the fixed-dataset spine (`supervised.run_supervised`), shares the answer log-prob code
(`experience.answer_logprobs` alignment) and the loss (`rl_math.dpo_loss`) with the rest of
fastrlhf; only the batch loss is new here.

The step-2 items carry prompt + answer without the prompt length, so the answer is taken to
start after the longest common prefix of the chosen and rejected rows. That is exact for the
loss: a token of the shared prefix has the same context in both rows, so its log-prob
appears in both sums and cancels in (chosen - rejected).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..models.loading import disable_dropout, load_causal_lm
from ..utils.positions import position_ids_from_mask
from . import rl_math as M
from .packing import check_models
from .reward_trainer import pairs_in
from .run_setup import training_dtype
from .supervised import run_supervised
from .configs import DPOConfig
from .logprobs import IGNORE_INDEX, shifted_logprobs


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


def sequence_logprob_sums(model, input_ids, attention_mask, answer_mask, packed: bool = False) -> torch.Tensor:
    """Sum over answer tokens of log p(token | prefix) -> [rows] (only answer tokens are scored)."""
    labels = input_ids.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(answer_mask == 0, IGNORE_INDEX)
    logp = shifted_logprobs(model, input_ids, attention_mask, labels=labels,
                            position_ids=position_ids_from_mask(attention_mask), packed=packed)
    return (logp * answer_mask).sum(-1)


def dpo_batch_loss(engine, ref_model, batch: Dict[str, torch.Tensor], beta: float, label_smoothing: float,
                   packed: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DPO loss of a PairCollator batch (B chosen rows, then their B rejected twins)."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    amask = answer_mask_after_common_prefix(ids, att)
    half = ids.shape[0] // 2
    policy = sequence_logprob_sums(engine, ids, att, amask, packed)
    with torch.no_grad():
        ref = sequence_logprob_sums(ref_model, ids, att, amask, packed)
    return M.dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta, label_smoothing)


def evaluate_dpo(trainer, ref_model, cfg: DPOConfig) -> Dict[str, float]:
    """DPO loss, reward accuracy and margin over the held-out pairs of all ranks."""
    def batch_sums(batch):
        loss, st = dpo_batch_loss(trainer.engine, ref_model, batch, cfg.beta, cfg.label_smoothing)
        n = batch["input_ids"].shape[0] // 2
        return [loss.item() * n, st["reward_accuracy"].item() * n, st["reward_margin"].item() * n, n]

    loss, accuracy, margin, pairs = trainer.eval_sums(batch_sums, 4)
    n = max(pairs, 1.0)
    return {"loss": loss / n, "reward_accuracy": accuracy / n, "reward_margin": margin / n}


def train_dpo(cfg: DPOConfig, *, model=None, tokenizer=None, datasets: Optional[Tuple[Any, Any]] = None,
              collate=None) -> Dict[str, Any]:
    """Train the policy with DPO and save it (HF format) to cfg.output_dir."""
    from ..data.collators import PairCollator
    reference = {}

    def prepare(policy, ctx, tok):
        disable_dropout(policy)  # the policy and reference must score identically at step 0
        ref = load_causal_lm(cfg.ref_model or cfg.model_name_or_path, tokenizer=tok, dtype=training_dtype(ctx),
                             seed=cfg.seed)
        reference["model"] = ref.to(ctx.device).eval().requires_grad_(False)
        if cfg.packing:
            check_models({"reference": reference["model"]}, ctx)

    return run_supervised(
        cfg, step=2, label="DPO", load_model=load_causal_lm, default_collate=PairCollator, denominator=pairs_in,
        loss_fn=lambda engine, batch, packed=False: dpo_batch_loss(engine, reference["model"], batch, cfg.beta,
                                                                   cfg.label_smoothing, packed)[0],
        evaluate_fn=lambda trainer: evaluate_dpo(trainer, reference["model"], cfg),
        fmt=lambda m: (f"loss {m['loss']:.4f}, reward accuracy {m['reward_accuracy']:.3f}, "
                       f"reward margin {m['reward_margin']:.4f}"),
        prepare_model=prepare, model=model, tokenizer=tokenizer, datasets=datasets, collate=collate)
