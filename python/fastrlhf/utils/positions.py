"""Position ids of a left-padded batch: the one definition the trainer, the reward model and the
hybrid engine share, so a rollout's log-probs and the trainer's see the same positions."""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (HF generate's cumsum of the mask): a left-padded row
    gets the positions of its unpadded twin; padding columns get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
