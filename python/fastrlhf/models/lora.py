"""fastrlhf LoRA: a drop-in replacement for nn.Linear with a low-rank update.

`LoRALinear` keeps the base `weight`/`bias` under the same names as nn.Linear (so HF
state-dict keys and weight tying are unchanged) plus `lora_a` [r, in] and `lora_b` [out, r];
the forward is `fastrlhf.ops.lora_linear`, so the fused kernels serve training as well.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj",
                   "down_proj", "fc1", "fc2", "query_key_value", "dense", "c_attn", "c_proj",
                   "c_fc", "dense_h_to_4h", "dense_4h_to_h")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        if isinstance(self.dropout, nn.Dropout) and self.training:
            # dropout acts on the low-rank input only, so the paths are computed apart
            base = nn.functional.linear(x, self.weight, self.bias)
            low = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_a), self.lora_b)
            return base + self.scaling * low
        return ops.lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank update into `weight` permanently (for export)."""
        if not self.merged:
            ops.lora_fuse(self.weight.data, self.lora_a.data, self.lora_b.data, self.scaling,
                          out=self.weight.data)
            self.merged = True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for p in patterns:
        if leaf == p or re.fullmatch(p, name) or re.fullmatch(p, leaf):
            return True
    return False


def apply_lora(model: nn.Module, r: int, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Optional[Union[str, Iterable[str]]] = None) -> List[str]:
    """Replace every nn.Linear whose name matches `target_modules` (leaf names or regexes over
    the full name) by a LoRALinear. Returns the replaced names; raises if none matched."""
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    patterns = list(target_modules or DEFAULT_TARGETS)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and _matches(full, patterns) and "lm_head" not in full:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                replaced.append(full)
    if not replaced:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                               if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matched LoRA target_modules={patterns}; this model's "
                         f"linear layers are named {linear_names}")
    return replaced


def only_optimize_lora(model: nn.Module) -> int:
    """Freeze everything but LoRA parameters; returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = "lora_a" in name or "lora_b" in name
        n += p.numel() if p.requires_grad else 0
    return n


def lora_modules(model: nn.Module) -> List[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRALinear into a plain nn.Linear (in place), e.g. before save_pretrained."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.weight.device, dtype=child.weight.dtype)
                lin.weight = child.weight
                lin.bias = child.bias
                setattr(module, child_name, lin)
    return model
