"""Packed rows: the real tokens of a padded batch laid end to end in one row, with positions that
restart at 0 for each sequence (HF's padding-free convention: `position_ids` and no
`attention_mask`; transformers then builds a mask that keeps each token inside its own sequence).

A model run on the packed row computes what it computes on the padded batch, for every real
token, without the padding's FLOPs. Per-token results come back to the padded layout through
`unpack`, so everything downstream (masks, losses, per-sequence sums) is unchanged.

Shared prefixes (`shared_prefix=P`): rows whose first P columns hold the same tokens (a GRPO
group's answers to one prompt) put those tokens in the row once, in the first such row (the
group's *leader*); the other rows' entries there point at the leader's (`slots`, `unpack`). Each
row still attends as its own sequence, the prefix included (`grid`), so every row computes what it
computes alone; only fastrlhf's packed attention (`models.packed_attention`) can run such a row:
HF's mask from the positions alone would cut the followers off their prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .positions import position_ids_from_mask


@dataclass
class PackedRows:
    """Where the real tokens of a [B, S] batch go in the packed row [1, T]."""
    index: torch.Tensor         # [T] flat positions b * S + c of the tokens the row holds, in row order
    position_ids: torch.Tensor  # [1, T] each sequence counts its own real tokens from 0
    cu_seqlens: Optional[torch.Tensor]  # [B + 1] int32 sequence boundaries in the row; None when shared
    shape: Tuple[int, int]      # (B, S)
    slot: torch.Tensor          # [B, S] long: each entry's place in the row, -1 at the padding
    shared: bool = False        # some rows read their prefix from another row's tokens

    @classmethod
    def of(cls, attention_mask: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
           shared_prefix: int = 0) -> "PackedRows":
        """From a padding mask (1 = real token; left, right or both sides padded). With input_ids and
        shared_prefix P > 0, rows whose first P columns are equal (tokens and padding) hold them once."""
        mask = attention_mask.bool()
        b, s = mask.shape
        owned, leader, p = mask, None, min(shared_prefix, s)
        if p > 0 and b > 1 and input_ids is not None:
            key = torch.where(mask[:, :p], input_ids[:, :p], torch.full_like(input_ids[:, :p], -1))
            _, group = torch.unique(key, dim=0, return_inverse=True)
            rows = torch.arange(b, device=mask.device)
            first = torch.full((b,), b, dtype=torch.long, device=mask.device).scatter_reduce(
                0, group, rows, "amin")
            leader = first[group]
            followers = leader != rows
            if bool((followers[:, None] & mask[:, :p]).any()):
                owned = mask.clone()
                owned[followers, :p] = False
            else:
                leader = None
        index = owned.reshape(-1).nonzero().squeeze(1)
        slot = torch.full((b * s,), -1, dtype=torch.long, device=mask.device)
        slot[index] = torch.arange(index.numel(), device=mask.device)
        slot = slot.view(b, s)
        if leader is not None:
            slot[:, :p] = torch.where(mask[:, :p], slot[leader, :p], slot[:, :p])
        # the positions the padded forward uses (left padding skipped), so both compute the same
        positions = position_ids_from_mask(attention_mask).reshape(-1)[index]
        cu = None
        if leader is None:
            cu = torch.zeros(b + 1, dtype=torch.int32, device=mask.device)
            cu[1:] = mask.sum(1).cumsum(0)
        return cls(index, positions[None], cu, (b, s), slot, leader is not None)

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, T, ...]: the held tokens' entries, end to end."""
        b, s = self.shape
        return x.reshape(b * s, *x.shape[2:])[self.index][None]

    def unpack(self, y: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """[1, T, ...] -> [B, S, ...], `fill` at the padding (differentiable in y; a shared entry
        appears in each row that shares it)."""
        b, s = self.shape
        y = y[0]
        if self.shared:
            ext = torch.cat([y, y.new_full((1, *y.shape[1:]), fill)])
            return ext[torch.where(self.slot >= 0, self.slot, self.num_tokens)]
        out = y.new_full((b * s, *y.shape[1:]), fill).index_copy(0, self.index, y)
        return out.view(b, s, *y.shape[1:])

    def slots(self) -> torch.Tensor:
        """[B, S] long: each padded entry's place in the packed row, -1 at the padding."""
        return self.slot

    def grid(self) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """The sequences as attention sees them, right-padded into [B, L] cells (L the longest):
        (src [B * L]: each cell's place in the row, T at the padding; home [T]: the cell each of the
        row's tokens takes its output from (its own row's, for a shared prefix its leader's); B; L)."""
        b, _ = self.shape
        real = self.slot >= 0
        longest = int(real.sum(1).max()) if b else 0
        rank = real.long().cumsum(1) - 1
        cells = (torch.arange(b, device=real.device)[:, None] * longest + rank)[real]
        slots = self.slot[real]
        src = torch.full((b * longest,), self.num_tokens, dtype=torch.long, device=real.device)
        src[cells] = slots
        owned = torch.zeros(real.numel(), dtype=torch.bool, device=real.device)
        owned[self.index] = True
        owned = owned.view(real.shape)[real]
        home = torch.empty(self.num_tokens, dtype=torch.long, device=real.device)
        home[slots[owned]] = cells[owned]
        return src, home, b, longest
