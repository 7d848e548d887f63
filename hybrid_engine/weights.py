"""Generation weights: views of the training parameters, with LoRA fused into separate buffers.

`Linear` is what the decoder multiplies by. For a plain nn.Linear / Conv1D its tensors ARE the
training parameters (`.data` views, no copy). A LoRA-wrapped linear (fastrlhf LoRALinear or
PEFT LoRA) gets its update fused into a NEW buffer (`ops.lora_fuse(..., out=None)`), so the
training base weight is never written: after any number of fuse/unfuse cycles it is
bit-identical, in every dtype. "Unfuse" is dropping the buffer. Copies happen only there and
in the optional QKV / gate-up concatenation (`fuse_projections=True`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from fastrlhf import ops
from fastrlhf.models.lora import LoRALinear


@dataclass
class Linear:
    """y = x @ W^T + b (weight [out, in]) or, when `transposed`, y = x @ W + b (weight [in, out])."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    transposed: bool = False
    fused_lora: bool = False  # weight is a private buffer holding W + scaling * B @ A
    # tensor parallelism, row-parallel shard: sums the partial products over the group (in place)
    # before the bias is added
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            y = torch.matmul(x, self.weight) if self.transposed else nn.functional.linear(x, self.weight)
            self.reduce(y)
            return y if self.bias is None else y.add_(self.bias)
        if self.transposed:
            y = torch.matmul(x, self.weight)
            return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self.weight, self.bias)

    def as_out_in(self) -> torch.Tensor:
        """The weight as [out, in] (a transposed view for Conv1D weights)."""
        return self.weight.t() if self.transposed else self.weight


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _peft_lora_layer(m: nn.Module) -> bool:
    return hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "lora_B")


def _fuse_all(weight: torch.Tensor, updates: List[Tuple[torch.Tensor, torch.Tensor, float]],
              transposed: bool, backend: Optional[str]) -> torch.Tensor:
    """W + sum scaling * B @ A into a new buffer (never into `weight`); keeps W's layout."""
    w = weight.t() if transposed else weight  # [out, in] view
    fused = None
    for a, b, s in updates:
        src = w if fused is None else fused
        fused = ops.lora_fuse(src, a.to(src.dtype), b.to(src.dtype), s, backend=backend)
        if fused.data_ptr() == w.data_ptr():  # a backend must not write the training weight
            raise RuntimeError("ops.lora_fuse(out=None) wrote into the base weight; the engine "
                               "needs a new buffer to keep training weights bit-exact")
    return fused.t() if transposed else fused


@dataclass
class LinearParts:
    """The parameters behind an HF linear module: its base weight (native layout: [out, in], or
    [in, out] when `transposed`, as GPT-2's Conv1D), bias, and the LoRA updates to fuse as
    (A [r, in], B [out, r], scaling). Parameters, not tensors: a tensor-parallel build slices
    them (or gathers slices of ZeRO-3 partitions) before reading."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    transposed: bool
    lora: List[Tuple[torch.Tensor, torch.Tensor, float]]


def linear_parts(module: nn.Module, *, fuse_lora: bool = True) -> LinearParts:
    """What `resolve_linear` reads from a plain or LoRA-wrapped linear (clear errors for others)."""
    if isinstance(module, LoRALinear):
        lora = [] if module.merged or not fuse_lora else [(module.lora_a, module.lora_b, module.scaling)]
        return LinearParts(module.weight, module.bias, False, lora)
    if _peft_lora_layer(module):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
        parts = linear_parts(base, fuse_lora=False)
        if module.merged or getattr(module, "disable_adapters", False) or not fuse_lora:
            return parts
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(name, False):
                raise NotImplementedError(
                    f"PEFT adapter {name!r} uses DoRA, which the engine cannot fuse; use "
                    "EngineConfig(fallback='hf') or a plain LoRA adapter")
            parts.lora.append((module.lora_A[name].weight, module.lora_B[name].weight,
                               float(module.scaling[name])))
        return parts
    if _is_conv1d(module):
        return LinearParts(module.weight, module.bias, True, [])
    if isinstance(module, nn.Linear):
        return LinearParts(module.weight, module.bias, False, [])
    raise TypeError(f"the engine cannot read weights from a {type(module).__name__} module; "
                    "expected nn.Linear, Conv1D, fastrlhf LoRALinear or a PEFT LoRA layer "
                    "(or use EngineConfig(fallback='hf'))")


def resolve_linear(module: nn.Module, *, backend: Optional[str] = None, fuse_lora: bool = True) -> Linear:
    """The generation-time Linear of an HF linear module, plain or LoRA-wrapped."""
    parts = linear_parts(module, fuse_lora=fuse_lora)
    w = parts.weight.data
    b = None if parts.bias is None else parts.bias.data
    if not parts.lora:
        return Linear(w, b, parts.transposed)
    fused = _fuse_all(w, [(a.data, bb.data, s) for a, bb, s in parts.lora], parts.transposed, backend)
    return Linear(fused, b, parts.transposed, fused_lora=True)


def concat_linears(parts: List[Linear]) -> Linear:
    """One Linear computing all `parts` side by side (a COPY of their weights, [sum out, in])."""
    ws = [p.as_out_in() for p in parts]
    weight = torch.cat(ws, dim=0)
    if all(p.bias is None for p in parts):
        bias = None
    else:
        bias = torch.cat([p.bias if p.bias is not None
                          else torch.zeros(p.out_features, dtype=weight.dtype, device=weight.device)
                          for p in parts])
    return Linear(weight, bias)


@dataclass
class Norm:
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def resolve_norm(module: nn.Module, offset: float = 0.0) -> Norm:
    """The norm's weight/bias as views of the training parameters; with an `offset` (Gemma's
    RMSNorm scales by 1 + w) the weight is a NEW fp32 buffer offset + w, built here once per
    inference entry (like fused LoRA), so it follows the live (e.g. ZeRO-3 gathered) weight."""
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    if w is not None and offset:
        w = w.data.float() + offset  # fp32, as HF computes (1.0 + w.float())
        return Norm(w, None if b is None else b.data)
    return Norm(None if w is None else w.data, None if b is None else b.data)


def get_path(root: nn.Module, path: Optional[str]):
    """The submodule at a dotted path (None for a None path or a missing part)."""
    if path is None:
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def require_path(root: nn.Module, path: str, what: str):
    """The submodule at `path`, or a clear error naming `what` is missing."""
    obj = get_path(root, path)
    if obj is None:
        raise ValueError(f"the model has no {what} at {path!r}; its architecture does not match "
                         "the engine spec (use EngineConfig(fallback='hf'))")
    return obj
