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
    # tensor-parallel generation over groups of tp_size consecutive ranks (torch.distributed must be
    # initialized; see tensor_parallel.py). Training is unaffected.
    tp_size: int = 1
    # under tensor parallelism: "vocab_parallel" (the token embedding and lm_head split by
    # vocabulary rows; default, by measurement: benchmarks/results/tp_notes.md) or "replicated"
    tp_lm_head: str = "vocab_parallel"
    # paged KV cache (kv_cache.py): tokens per block (a power of two), and the pool's size in
    # tokens. None sizes the pool by rule (kv_cache.pool_blocks): what the call needs with every
    # admitted row at its longest, capped on a GPU at kv_cache_memory_fraction of the free memory
    kv_block_size: int = 16
    kv_cache_tokens: Optional[int] = None
    kv_cache_memory_fraction: float = 0.5
    # rows decoding at once (None: as many as there are sequences, the pool permitting), and
    # whether a finished row is refilled at once from the queue (continuous batching) or only
    # when its whole static batch has finished (the first engine's behaviour)
    max_batch_size: Optional[int] = None
    continuous_batching: bool = True

    def validate(self) -> None:
        if self.fallback not in (None, "hf"):
            raise ValueError(f"EngineConfig.fallback must be None or 'hf', got {self.fallback!r}")
        if self.zero3_gather not in ("all", "layer"):
            raise ValueError(f"EngineConfig.zero3_gather must be 'all' or 'layer', got "
                             f"{self.zero3_gather!r}")
        if self.stop_check_every < 1:
            raise ValueError("EngineConfig.stop_check_every must be >= 1")
        if not isinstance(self.tp_size, int) or isinstance(self.tp_size, bool) or self.tp_size < 1:
            raise ValueError(f"EngineConfig.tp_size must be an integer >= 1, got {self.tp_size!r}")
        if self.tp_lm_head not in ("vocab_parallel", "replicated"):
            raise ValueError(f"EngineConfig.tp_lm_head must be 'vocab_parallel' or 'replicated', got "
                             f"{self.tp_lm_head!r}")
        bs = self.kv_block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1 or bs & (bs - 1):
            raise ValueError(f"EngineConfig.kv_block_size must be a positive power of two (e.g. 16), got {bs!r}")
        if self.kv_cache_tokens is not None and (not isinstance(self.kv_cache_tokens, int)
                                                 or self.kv_cache_tokens < 1):
            raise ValueError(f"EngineConfig.kv_cache_tokens must be a positive int or None (sized by rule), "
                             f"got {self.kv_cache_tokens!r}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.kv_cache_memory_fraction must be in (0, 1], got "
                             f"{self.kv_cache_memory_fraction!r}")
        if self.max_batch_size is not None and (not isinstance(self.max_batch_size, int)
                                                or isinstance(self.max_batch_size, bool) or self.max_batch_size < 1):
            raise ValueError(f"EngineConfig.max_batch_size must be an int >= 1 or None (all at once), got "
                             f"{self.max_batch_size!r}")
        if not isinstance(self.continuous_batching, bool):
            raise ValueError(f"EngineConfig.continuous_batching must be True or False, got "
                             f"{self.continuous_batching!r}")
        if self.tp_size > 1 and self.fallback is not None:
            raise ValueError(f"EngineConfig(tp_size={self.tp_size}) runs the engine's own decoder; the HF "
                             "fallback generates on one rank. Use tp_size=1 with fallback='hf'")


@dataclass
class GenerationOutput:
    sequences: torch.Tensor                  # [B, P + N]
    logprobs: Optional[torch.Tensor] = None  # [B, N] fp32
