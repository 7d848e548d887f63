"""Step 1: supervised fine-tuning of a causal LM (loss on the answer tokens unless
`data.train_on_prompt`), with eval perplexity printed before and after training.

    from fastrlhf.config import SFTConfig
    from fastrlhf.rlhf.sft import train_sft
    result = train_sft(SFTConfig(max_steps=100))     # -> {"eval_before", "eval_after", "losses", ...}
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import SFTConfig
from ..models.loading import apply_lora_from_config, enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from ..utils.distributed import all_reduce_sum
from ..utils.logging import print_rank0
from . import checkpoint as ckpt_lib
from .common import (GlobalBatchSampler, describe_run, eval_batches, initialize_engine, run_training,
                     setup_run, to_device, total_train_steps, training_dtype)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled positions (labels != -100) and their count."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                            shift_labels.clamp(min=0).reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum(), mask.sum()


def sft_loss(engine, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    total, count = token_nll(out.logits, batch["labels"])
    return total / count.clamp(min=1)


@torch.no_grad()
def evaluate_perplexity(engine, dataset, collate, batch_size: int, rank: int, world: int,
                        max_batches: Optional[int] = None) -> Dict[str, float]:
    """Token-weighted eval loss and perplexity over all ranks' shards."""
    was_training = engine.training
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for batch, weight in eval_batches(dataset, collate, batch_size, rank, world, max_batches):
        batch = to_device(batch, engine.device)
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        total, count = token_nll(out.logits, batch["labels"])
        sums += weight * torch.tensor([total.item(), count.item()], dtype=torch.float64)
    sums = all_reduce_sum(sums)
    if was_training:
        engine.train()
    loss = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train_sft(cfg: SFTConfig, *, model=None, tokenizer=None, datasets: Optional[Tuple[Any, Any]] = None,
              collate=None) -> Dict[str, Any]:
    """Run step 1 and save the final HF model to cfg.output_dir.

    `model` (an HF causal LM or PeftModel), `tokenizer` and `datasets` ((train, eval) torch datasets
    of fastrlhf.data step-1 items) may be passed in instead of being loaded from `cfg`."""
    cfg.validate()
    ctx = setup_run(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model_name_or_path)
    if datasets is None:
        from ..data import build_datasets
        datasets = build_datasets(cfg.data, tokenizer, 1)
    train_ds, eval_ds = datasets
    if collate is None:
        from ..data import SFTCollator
        collate = SFTCollator(tokenizer.pad_token_id)
    if model is None:
        model = load_causal_lm(cfg.model_name_or_path, tokenizer=tokenizer, dtype=training_dtype(ctx),
                               seed=cfg.seed, ds_config=ctx.ds_config)
    apply_lora_from_config(model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    sampler = GlobalBatchSampler(len(train_ds), ctx.micro_batch_size, ctx.accumulation, ctx.world_size,
                                 ctx.rank, cfg.seed)
    total_steps = total_train_steps(cfg, sampler.steps_per_epoch)
    engine = initialize_engine(model, cfg, ctx, total_steps)
    describe_run(ctx, engine.module, len(train_ds), len(eval_ds), total_steps)

    eval_bs = cfg.eval_batch_size or ctx.micro_batch_size

    def evaluate() -> Dict[str, float]:
        return evaluate_perplexity(engine, eval_ds, collate, eval_bs, ctx.rank, ctx.world_size, cfg.eval_max_batches)

    before = evaluate()
    print_rank0(f"[step 1 SFT] eval before training: loss {before['loss']:.4f}, perplexity {before['perplexity']:.3f}")
    ctx.metrics.log({f"eval/{k}": v for k, v in before.items()}, 0)
    result = run_training(engine=engine, ctx=ctx, train_dataset=train_ds, collate=collate, loss_fn=sft_loss,
                          evaluate=evaluate, sampler=sampler, total_steps=total_steps, tokenizer=tokenizer,
                          desc="step 1 SFT")
    after = evaluate()
    print_rank0(f"[step 1 SFT] eval after training:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.3f}")
    ctx.metrics.log({f"eval/{k}": v for k, v in after.items()}, result["step"])
    ckpt_lib.save_hf_model(engine, cfg.output_dir, tokenizer=tokenizer, merge_lora=cfg.merge_lora_on_save)
    print_rank0(f"[step 1 SFT] model saved to {cfg.output_dir}")
    ctx.metrics.close()
    return {"eval_before": before, "eval_after": after, "losses": result["losses"], "steps": result["step"],
            "output_dir": cfg.output_dir, "engine": engine}
