"""Token selection: repetition penalty, min_new_tokens, temperature, top-k, top-p, greedy.

Applied in HF's order (penalty, min-length, temperature, top-k, top-p) so that greedy and
filtered sampling mean the same thing as in `transformers.generate`. Everything is in fp32
on [B, V] logits; randomness comes only from the given torch.Generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class SamplingParams:
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    def validate(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; "
                             "use do_sample=False for greedy decoding")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got "
                             f"{self.repetition_penalty}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the sequence (seen [B, V] bool):
    positive logits are divided by `penalty`, negative ones multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept, as in HF)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches p
    (always at least the most likely one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, *, seen: Optional[torch.Tensor],
                   n_generated: int, eos_ids: Sequence[int]) -> torch.Tensor:
    """The distribution-shaping steps before choosing a token; logits [B, V] fp32."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if n_generated < params.min_new_tokens and eos_ids:
        logits = logits.clone()
        logits[:, list(eos_ids)] = float("-inf")
    if not params.do_sample:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """Greedy argmax or one multinomial draw per row from processed logits [B, V] -> [B]."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def make_generator(seed_or_gen, device: torch.device) -> Optional[torch.Generator]:
    """A torch.Generator on `device` from an int seed, an existing generator, or None."""
    if seed_or_gen is None or isinstance(seed_or_gen, torch.Generator):
        if isinstance(seed_or_gen, torch.Generator) and seed_or_gen.device.type != device.type:
            raise ValueError(f"generator is on {seed_or_gen.device} but the model is on {device}; "
                             f"create it with torch.Generator(device='{device.type}') or pass an int seed")
        return seed_or_gen
    if isinstance(seed_or_gen, int):
        return torch.Generator(device=device).manual_seed(seed_or_gen)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got "
                    f"{type(seed_or_gen).__name__}")
