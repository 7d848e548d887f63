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
from ..models.loading import load_causal_lm
from ..utils.distributed import all_reduce_sum
from .common import eval_batches, run_supervised_step, to_device


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
    from ..data import SFTCollator
    return run_supervised_step(
        cfg, step=1, label="step 1 SFT", load_model=load_causal_lm, default_collate=SFTCollator,
        loss_fn=sft_loss, evaluate_fn=evaluate_perplexity,
        fmt=lambda m: f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}",
        model=model, tokenizer=tokenizer, datasets=datasets, collate=collate)
