"""Step 2: reward model on preference pairs, pairwise loss -log sigmoid(r_chosen - r_rejected).

Eval reports pairwise accuracy (share of pairs with r_chosen > r_rejected) and the mean chosen
and rejected scores, before and after training. The backbone starts from `model_name_or_path`
(the base model by default, as DeepSpeed-Chat does, or the SFT output).

    from fastrlhf.rlhf.configs import RMConfig
    from fastrlhf.rlhf.reward_trainer import train_reward_model
    result = train_reward_model(RMConfig(max_steps=100))   # -> {"eval_before", "eval_after", ...}
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..models.reward import RewardModel, last_token_index
from .supervised import run_supervised
from .configs import RMConfig


def pair_scores(engine, batch: Dict[str, torch.Tensor], packed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen (first half) and rejected (second half) rows of a PairCollator batch
    (packed=True: the real tokens packed into one row)."""
    # call through the engine (ZeRO-3 hooks run in its forward); RewardModel.forward gives per-token values
    values = engine(batch["input_ids"], batch["attention_mask"], **({"packed": True} if packed else {}))
    scores = values.gather(1, last_token_index(batch["attention_mask"]).unsqueeze(1)).squeeze(1)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def rm_loss(engine, batch: Dict[str, torch.Tensor], packed: bool = False) -> torch.Tensor:
    chosen, rejected = pair_scores(engine, batch, packed)
    return pairwise_loss(chosen, rejected)


def pairs_in(batch: Dict[str, torch.Tensor]) -> float:
    """The denominator of a pair batch's mean loss: its pairs."""
    return batch["input_ids"].shape[0] / 2


def evaluate_pairs(trainer) -> Dict[str, float]:
    """Pairwise accuracy, mean chosen / rejected scores and loss over all ranks' shards."""
    def batch_sums(batch):
        chosen, rejected = pair_scores(trainer.engine, batch)
        return [(chosen > rejected).sum().item(), chosen.sum().item(), rejected.sum().item(), chosen.numel(),
                pairwise_loss(chosen, rejected).item() * chosen.numel()]

    correct, chosen, rejected, pairs, loss = trainer.eval_sums(batch_sums, 5)
    n = max(pairs, 1.0)
    return {"accuracy": correct / n, "chosen_score": chosen / n, "rejected_score": rejected / n, "loss": loss / n}


def _fmt(m: Dict[str, float]) -> str:
    return (f"accuracy {m['accuracy']:.3f}, mean chosen score {m['chosen_score']:.4f}, "
            f"mean rejected score {m['rejected_score']:.4f}, loss {m['loss']:.4f}")


def train_reward_model(cfg: RMConfig, *, model: Optional[RewardModel] = None, tokenizer=None,
                       datasets: Optional[Tuple[Any, Any]] = None, collate=None) -> Dict[str, Any]:
    """Run step 2 and save the reward model (documented format, see models/reward.py) to cfg.output_dir."""
    from ..data import PairCollator
    return run_supervised(
        cfg, step=2, label="step 2 RM", load_model=RewardModel.from_pretrained, default_collate=PairCollator,
        loss_fn=rm_loss, evaluate_fn=evaluate_pairs, fmt=_fmt, denominator=pairs_in,
        model=model, tokenizer=tokenizer, datasets=datasets, collate=collate)
