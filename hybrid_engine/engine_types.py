"""Public value types of the engine: its configuration and a generation's output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class EngineConfig:
    fallback: Optional[str] = None       # "hf": plain HF generate through this interface
    cuda_graphs: bool = True             # capture decode steps on GPU (ignored on CPU)
    zero3_gather: str = "all"            # "all" at once, or "layer" by layer (less memory)
    backend: Optional[str] = None        # fastrlhf.ops backend (None: the ops default)
    # concatenate q/k/v and gate/up weights into one matmul each. This is a COPY of those
    # weights at every eval(), which did not pay on the CPU (benchmarks/results/engine_notes.md);
    # off by default, so generation weights are pure views.
    fuse_projections: bool = False
    lean_cpu_decode: bool = True         # torch-backend decode step in fewer ops (attention.LeanDecodeAttention)
    stop_check_every: int = 8            # GPU: host sync for "all finished?" every N steps

    def validate(self) -> None:
        if self.fallback not in (None, "hf"):
            raise ValueError(f"EngineConfig.fallback must be None or 'hf', got {self.fallback!r}")
        if self.zero3_gather not in ("all", "layer"):
            raise ValueError(f"EngineConfig.zero3_gather must be 'all' or 'layer', got "
                             f"{self.zero3_gather!r}")
        if self.stop_check_every < 1:
            raise ValueError("EngineConfig.stop_check_every must be >= 1")


@dataclass
class GenerationOutput:
    sequences: torch.Tensor                  # [B, P + N]
    logprobs: Optional[torch.Tensor] = None  # [B, N] fp32
