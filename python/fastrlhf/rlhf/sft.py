"""Step 1: supervised fine-tuning of a causal LM (loss on the answer tokens unless
`data.train_on_prompt`), with eval perplexity printed before and after training.

    from fastrlhf.rlhf.configs import SFTConfig
    from fastrlhf.rlhf.sft import train_sft
    result = train_sft(SFTConfig(max_steps=100))     # -> {"eval_before", "eval_after", "losses", ...}
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from ..models.loading import load_causal_lm
from .supervised import run_supervised
from .configs import SFTConfig
from .logprobs import IGNORE_INDEX, shifted_logprobs


def sequence_nll(model, batch: Dict[str, torch.Tensor], packed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the labelled positions and their count, from the fused log-probs
    (`logprobs.shifted_logprobs`: only labelled tokens are scored, no [tokens, vocab] logits);
    packed=True runs the batch's real tokens packed into one row."""
    logp = shifted_logprobs(model, batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                            packed=packed)
    return -logp.sum(), (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def sft_loss(engine, batch: Dict[str, torch.Tensor], packed: bool = False) -> torch.Tensor:
    total, count = sequence_nll(engine, batch, packed)
    return total / count.clamp(min=1)


def labelled_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """The denominator of a batch's SFT loss: its labelled next-token targets."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate_perplexity(trainer) -> Dict[str, float]:
    """Token-weighted eval loss and perplexity over all ranks' shards."""
    def batch_sums(batch):
        total, count = sequence_nll(trainer.engine, batch)
        return [total.item(), count.item()]

    nll, tokens = trainer.eval_sums(batch_sums, 2)
    loss = nll / tokens if tokens > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train_sft(cfg: SFTConfig, *, model=None, tokenizer=None, datasets: Optional[Tuple[Any, Any]] = None,
              collate=None) -> Dict[str, Any]:
    """Run step 1 and save the final HF model to cfg.output_dir.

    `model` (an HF causal LM or PeftModel), `tokenizer` and `datasets` ((train, eval) torch datasets
    of fastrlhf.data step-1 items) may be passed in instead of being loaded from `cfg`."""
    from ..data import SFTCollator
    return run_supervised(
        cfg, step=1, label="step 1 SFT", load_model=load_causal_lm, default_collate=SFTCollator,
        loss_fn=sft_loss, evaluate_fn=evaluate_perplexity, denominator=labelled_tokens,
        fmt=lambda m: f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}",
        model=model, tokenizer=tokenizer, datasets=datasets, collate=collate)
