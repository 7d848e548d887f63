"""ZeRO-3 gathering: make partitioned parameters whole for generation, release them after.

Uses `deepspeed.zero.GatheredParameters(..., modifier_rank=None)` (read-only: nothing is
written back, the optimizer's fp32 partitions and state are untouched). Models that are not
ZeRO-3 partitioned pass through with a null context.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def partitioned_params(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [p for p in params if is_partitioned(p)]


def model_is_zero3(model: nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


def gathered(params: Iterable[torch.Tensor]):
    """Context manager: the ZeRO-3 partitioned ones among `params` are whole inside it."""
    parts = partitioned_params(params)
    if not parts:
        return contextlib.nullcontext()
    import deepspeed  # only needed for partitioned models

    return deepspeed.zero.GatheredParameters(parts, modifier_rank=None)
