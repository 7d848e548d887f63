"""Packed rows: the real tokens of a padded batch laid end to end in one row, with positions that
restart at 0 for each sequence (HF's padding-free convention: `position_ids` and no
`attention_mask`; transformers then builds a mask that keeps each token inside its own sequence).

A model run on the packed row computes what it computes on the padded batch, for every real
token, without the padding's FLOPs. Per-token results come back to the padded layout through
`unpack`, so everything downstream (masks, losses, per-sequence sums) is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .positions import position_ids_from_mask


@dataclass
class PackedRows:
    """Where the real tokens of a [B, S] batch go in the packed row [1, T]."""
    index: torch.Tensor         # [T] flat positions b * S + c of the real tokens, in row order
    position_ids: torch.Tensor  # [1, T] each sequence counts its own real tokens from 0
    cu_seqlens: torch.Tensor    # [B + 1] int32 sequence boundaries in the packed row
    shape: Tuple[int, int]      # (B, S)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "PackedRows":
        """From a padding mask (1 = real token; left, right or both sides padded)."""
        mask = attention_mask.bool()
        index = mask.reshape(-1).nonzero().squeeze(1)
        # the positions the padded forward uses (left padding skipped), so both compute the same
        positions = position_ids_from_mask(attention_mask).reshape(-1)[index]
        lengths = mask.sum(1)
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = lengths.cumsum(0)
        return cls(index, positions[None], cu, tuple(mask.shape))

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, T, ...]: the real tokens' entries, end to end."""
        b, s = self.shape
        return x.reshape(b * s, *x.shape[2:])[self.index][None]

    def unpack(self, y: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """[1, T, ...] -> [B, S, ...], `fill` at the padding (differentiable in y)."""
        b, s = self.shape
        y = y[0]
        out = y.new_full((b * s, *y.shape[1:]), fill).index_copy(0, self.index, y)
        return out.view(b, s, *y.shape[1:])

    def slots(self) -> torch.Tensor:
        """[B, S] long: each padded entry's place in the packed row, -1 at the padding."""
        b, s = self.shape
        out = torch.full((b * s,), -1, dtype=torch.long, device=self.index.device)
        out[self.index] = torch.arange(self.num_tokens, device=self.index.device)
        return out.view(b, s)
