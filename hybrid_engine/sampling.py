"""Token selection: repetition penalty, min_new_tokens, temperature, top-k, top-p, greedy.

Applied in HF's order (penalty, min-length, temperature, top-k, top-p) so that greedy and
filtered sampling mean the same thing as in `transformers.generate`. Everything is in fp32
on [B, V] logits.

Randomness per sequence, not per batch: every sequence has its own 62-bit seed
(`sequence_seeds`), folded to a 32-bit key, and the token at position j of sequence s is drawn by
inverse CDF with the uniform `counter_uniforms(key_s, j)`, a hash of the two. A sequence's samples therefore depend
on its seed and its own tokens only: not on which other sequences share its batch, on the
row it occupies, on when it was admitted or preempted, or on how many steps run between host
syncs. No generator state is consumed per step, so this also runs on device without syncs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
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
                   n_generated: Union[int, torch.Tensor], eos_ids: Sequence[int],
                   min_new: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
    """The distribution-shaping steps before choosing a token; logits [B, V] fp32.
    `n_generated` (int, or [B] per row) tokens are already generated; EOS is held back while it
    is below `min_new` (int or [B]; default params.min_new_tokens)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    min_new = params.min_new_tokens if min_new is None else min_new
    if eos_ids and isinstance(n_generated, torch.Tensor):
        early = n_generated < min_new  # [B]
        cols = torch.tensor(list(eos_ids), device=logits.device)
        logits = logits.clone()
        logits[:, cols] = logits[:, cols].masked_fill(early[:, None], float("-inf"))
    elif eos_ids and n_generated < min_new:
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


# -- per-sequence randomness -------------------------------------------------------------------
SEED_LIMIT = 1 << 62
_GOLDEN32 = np.uint32(0x9E3779B1)


def _mix32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser (lowbias32: xor-shift / multiply rounds) on uint32 arrays, whose
    arithmetic wraps modulo 2**32 by definition."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def seed_key(seed: int) -> int:
    """The 32-bit key a sequence's uniforms are hashed from, folded from its 62-bit seed."""
    halves = np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
    return int(_mix32(_mix32(halves[:1]) ^ halves[1:])[0])


def counter_uniforms(keys, counters) -> np.ndarray:
    """Uniforms in [0, 1) from (key, counter) pairs: keys [B] (seed_key), counters [..., B] (the
    positions of the tokens to draw) -> float32 [..., B]. Computed on the host: the same pair
    gives the same number on any device, and a window of decode steps gets all its draws at once."""
    k = np.asarray(keys, dtype=np.uint32)
    c = np.asarray(counters, dtype=np.int64).astype(np.uint32)
    h = _mix32(k ^ _mix32(c * _GOLDEN32))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row from processed logits [B, V] and uniforms [B]: the first token whose
    cumulative probability exceeds u * total. A token of probability 0 is never chosen (its
    cumulative sum equals its predecessor's); a rounding of u * total up to the total falls
    back to the last token of nonzero probability."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype) * total, right=True)[:, 0]
    last_real = (cdf < total).sum(dim=-1)
    return torch.minimum(idx, last_real)


def choose_tokens_seeded(logits: torch.Tensor, params: SamplingParams,
                         uniforms: Optional[torch.Tensor]) -> torch.Tensor:
    """Greedy argmax, or each row's inverse-CDF draw with its uniform (counter_uniforms of the
    sequence's key and the position the chosen token will take)."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    return sample_inverse_cdf(logits, uniforms)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sequence_seeds(generator, n: int, device: torch.device) -> List[int]:
    """The seeds of n sequences (returned rows, in order) from `generate`'s `generator=`:
    - an int s: the seeds a torch.Generator seeded with s draws (the same as passing
      torch.Generator().manual_seed(s)); row r's seed is the r-th draw whatever n is;
    - a sequence of n ints: one seed per row, as given (the same prompt with the same seed then
      gives the same answer in any batch);
    - a torch.Generator: n seeds drawn from it (it advances, so the next call differs);
    - None: n seeds drawn from torch's global generator (`torch.manual_seed` reproduces a run).
    """
    if isinstance(generator, bool):
        raise TypeError("generator must be a torch.Generator, an int seed, a list of int seeds or None, "
                        "got a bool")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    if generator is None or isinstance(generator, torch.Generator):
        if isinstance(generator, torch.Generator) and generator.device.type not in ("cpu", device.type):
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; create it "
                             f"with torch.Generator(device='{device.type}') or pass an int seed")
        kw = {} if generator is None else dict(generator=generator, device=generator.device)
        return [int(x) % SEED_LIMIT for x in torch.randint(0, SEED_LIMIT, (n,), **kw).tolist()]
    if isinstance(generator, (list, tuple)) or (isinstance(generator, torch.Tensor) and generator.dim() == 1):
        seeds = [int(x) for x in (generator.tolist() if isinstance(generator, torch.Tensor) else generator)]
        if len(seeds) != n:
            raise ValueError(f"generator: {len(seeds)} seeds given for {n} returned sequences; give one per "
                             "returned row (batch * num_return_sequences), or one int seed")
        return [_splitmix64(s & 0xFFFFFFFFFFFFFFFF) % SEED_LIMIT for s in seeds]
    raise TypeError(f"generator must be a torch.Generator, an int seed, a list of int seeds or None, got "
                    f"{type(generator).__name__}")
