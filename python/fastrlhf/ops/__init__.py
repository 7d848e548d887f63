"""fastrlhf.ops: one public function per kernel op, dispatched to a backend.

Layouts (all ops): attention tensors are [batch, heads, seq, head_dim]; KV caches are
[batch, kv_heads, max_seq, head_dim]; GQA/MQA means q has a multiple of k/v's heads.
The paged ops (`paged_*`) use block pools instead: see `fastrlhf.ops.paged_reference`.
Every function takes `backend=` ("auto" | "torch" | "triton" | "cuda"); see
`fastrlhf.ops.dispatch` for how the default is chosen and how an unavailable backend falls
back. The `torch` backend (`fastrlhf.ops.reference`) defines the semantics.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import BACKENDS, backend_status, get_backend, resolve, set_backend
from .paged_reference import paged_slot_mapping  # noqa: F401  (a helper of the paged ops, no kernel)

__all__ = [
    "attention_prefill", "attention_decode", "kv_cache_append", "lora_linear", "lora_fuse",
    "lora_unfuse", "rms_norm", "layer_norm", "rotary", "token_logprobs", "paged_kv_append",
    "paged_attention_decode", "paged_attention_prefill", "paged_slot_mapping", "fused_moe", "set_backend",
    "get_backend",
    "resolve", "backend_status", "BACKENDS", "OPS",
]

OPS = ("attention_prefill", "attention_decode", "kv_cache_append", "lora_linear", "lora_fuse",
       "lora_unfuse", "rms_norm", "layer_norm", "rotary", "token_logprobs",
       "paged_kv_append", "paged_attention_decode", "paged_attention_prefill", "fused_moe")


def _set(**kwargs):
    """The optional arguments that are set: passed on only then, so that a backend that does not
    know an argument still serves the calls that do not use it."""
    return {k: v for k, v in kwargs.items() if v is not None}


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                      attention_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                      softcap: Optional[float] = None, window: Optional[int] = None,
                      alibi_slopes: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Attention of q [B, Hq, Sq, D] over k, v [B, Hkv, Sk, D] -> [B, Hq, Sq, D].

    Query row i is key column i + (Sk - Sq) (bottom-right aligned, as with a KV cache).
    causal: query i sees keys j <= i + (Sk - Sq).
    attention_mask: [B, Sk], nonzero = real token (HF convention; left or right padding).
    A query row with no visible key (e.g. a left-pad position) returns zeros, never NaN.
    scale defaults to 1/sqrt(D). Softmax is computed in fp32.
    softcap (optional): scores -> softcap * tanh(scores / softcap) (Gemma2's attention logit
    softcapping).
    alibi_slopes (optional): fp32 [Hq]; scores += slope[h] * (key column - query column), after
    the softcap, before the masks (ALiBi; equal under softmax to Bloom's slope * key position).
    window (optional, causal only): query column p sees key columns p - window < j <= p (HF's
    sliding window: at most `window` keys, itself included); a window >= Sk is no window.
    cu_seqlens (optional): int32 [N + 1] boundaries of N sequences packed into the one row of
    q/k/v (B = 1, Sq = Sk, no attention_mask; flash-attn's varlen convention): token t of sequence
    n (cu_seqlens[n] <= t < cu_seqlens[n + 1]) sees only keys of sequence n (causally when
    causal); tokens at or after cu_seqlens[-1] see nothing (output 0). Window and alibi apply
    within each sequence (columns, i.e. positions relative to one another).
    The order is: scores -> softcap -> + alibi -> masks -> softmax. The optional arguments are
    passed to the backend only when set; docs/interfaces.md says which backend runs which.
    """
    _, fn = resolve("attention_prefill", q.device, backend)
    return fn(q, k, v, causal=causal, attention_mask=attention_mask, scale=scale,
              **_set(softcap=softcap, window=window, alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens))


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_lens: torch.Tensor, *, cache_starts: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """One new query per sequence: q [B, Hq, D] over caches [B, Hkv, Smax, D] -> [B, Hq, D].

    Sequence b attends cache positions cache_starts[b] <= j < cache_lens[b] (int tensors [B];
    starts default to 0; left-padded prompts start after their padding). GPU backends split
    the cache into fixed-size chunks so results do not depend on the batch composition.
    The query is column cache_lens[b] - 1: window keeps columns j > cache_lens[b] - 1 - window,
    alibi_slopes adds slope[h] * (j - (cache_lens[b] - 1)). softcap: as in attention_prefill.
    """
    _, fn = resolve("attention_decode", q.device, backend)
    return fn(q, k_cache, v_cache, cache_lens, cache_starts=cache_starts, scale=scale,
              **_set(softcap=softcap, window=window, alibi_slopes=alibi_slopes))


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    positions: torch.Tensor, *, backend: Optional[str] = None):
    """Write k, v [B, Hkv, T, D] into the caches at [positions[b], positions[b] + T), in place."""
    _, fn = resolve("kv_cache_append", k_cache.device, backend)
    return fn(k_cache, v_cache, k, v, positions)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], scaling: float,
                *, backend: Optional[str] = None) -> torch.Tensor:
    """x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ with W [out, in], A [r, in], B [out, r]; differentiable."""
    _, fn = resolve("lora_linear", x.device, backend)
    return fn(x, weight, bias, lora_a, lora_b, scaling)


def lora_fuse(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              *, out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """W + scaling·B·A in fp32, rounded once to W's dtype; written to `out` (may be `weight`)."""
    _, fn = resolve("lora_fuse", weight.device, backend)
    return fn(weight, lora_a, lora_b, scaling, out=out)


def lora_unfuse(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                *, out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """W - scaling·B·A (the inverse of lora_fuse up to rounding; see the engine for exactness)."""
    _, fn = resolve("lora_unfuse", weight.device, backend)
    return fn(weight, lora_a, lora_b, scaling, out=out)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None, *, backend: Optional[str] = None):
    """RMSNorm over the last dim in fp32. With `residual`: h = x + residual, returns (norm(h), h)."""
    _, fn = resolve("rms_norm", x.device, backend)
    return fn(x, weight, eps, residual)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, residual: Optional[torch.Tensor] = None, *,
               backend: Optional[str] = None):
    """LayerNorm over the last dim in fp32. With `residual`: returns (norm(x + residual), x + residual)."""
    _, fn = resolve("layer_norm", x.device, backend)
    return fn(x, weight, bias, eps, residual)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor, *, rotary_dim: Optional[int] = None,
           backend: Optional[str] = None):
    """Rotate-half rotary embedding, in place on the first `rotary_dim` (default D) features.

    q [B, Hq, S, D], k [B, Hk, S, D]; cos/sin fp32 tables [max_pos, rotary_dim // 2];
    positions [B, S] per-token position ids (per-sequence offsets, left padding). Returns (q, k).
    """
    _, fn = resolve("rotary", q.device, backend)
    return fn(q, k, cos, sin, positions, rotary_dim=rotary_dim)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   backend: Optional[str] = None):
    """log softmax(hidden·weightᵀ / temperature)[target] of every row, without the logits.

    hidden [N, H] (final hidden states), weight [V, H] (the lm_head / tied output embedding, no
    bias), targets [N] token ids -> log-probs [N] in fp32 (and, with return_entropy, the entropy
    [N] of each row's distribution: returns (logp, entropy)). Chunked over rows and vocabulary
    with an online logsumexp; the backward (d hidden, d weight) recomputes the blocks, so no
    [N, V] tensor is ever allocated in fp32 (the triton backend keeps one [rows, V] chunk of
    logits in the input dtype). Targets < 0 (HF's -100) give 0 and no gradient.
    """
    _, fn = resolve("token_logprobs", hidden.device, backend)
    return fn(hidden, weight, targets, temperature=temperature, return_entropy=return_entropy)


# ---------------------------------------------------------------- paged KV cache
# Pools per layer k_pool, v_pool [num_blocks, Hkv, block_size, D]; block_tables int32 [B, max_blocks];
# seq_lens int32 [B] (tokens in the cache, new ones included; sequences start at position 0 of
# their first block). Full contract: fastrlhf.ops.paged_reference and docs/interfaces.md.
def paged_kv_append(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor, *, backend: Optional[str] = None):
    """Write k, v [T, Hkv, D] into the pools in place: token t at slot_mapping[t] = block *
    block_size + offset (int [T]; slots < 0 are skipped, e.g. padding rows). Serves prefill (T
    tokens of many sequences) and decode (one per sequence) alike; `paged_slot_mapping` builds
    the slots from block tables. Returns (k_pool, v_pool)."""
    _, fn = resolve("paged_kv_append", k_pool.device, backend)
    return fn(k_pool, v_pool, k, v, slot_mapping)


def paged_attention_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                           scale: Optional[float] = None, softcap: Optional[float] = None,
                           window: Optional[int] = None, alibi_slopes: Optional[torch.Tensor] = None,
                           backend: Optional[str] = None) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] at position seq_lens[b] - 1, over the sequence's
    keys 0..seq_lens[b]-1 read through block_tables -> [B, Hq, D] (0 where seq_lens[b] == 0).

    scale defaults to 1/sqrt(D); softcap: scores -> softcap·tanh(scores/softcap); alibi_slopes
    fp32 [Hq]: score += slope[h]·(key position - query position); window: a query at p sees keys
    p - window < k <= p. Order: scale, softcap, alibi, masks, softmax in fp32. GPU kernels split
    each sequence's keys into chunks of a fixed size, so a sequence's output does not depend on
    which other sequences share the batch.
    """
    _, fn = resolve("paged_attention_decode", q.device, backend)
    return fn(q, k_pool, v_pool, block_tables, seq_lens, scale=scale, softcap=softcap, window=window,
              alibi_slopes=alibi_slopes)


def paged_attention_prefill(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, *,
                            max_q_len: Optional[int] = None, scale: Optional[float] = None,
                            softcap: Optional[float] = None, window: Optional[int] = None,
                            alibi_slopes: Optional[torch.Tensor] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Ragged queries of many sequences over their paged keys (prefill, extend/append) -> [T, Hq, D].

    q [T, Hq, D] packs the sequences' new tokens: rows cu_q_lens[b]:cu_q_lens[b+1] (int [B+1],
    starting at 0) are sequence b's last m_b positions seq_lens[b]-m_b .. seq_lens[b]-1, and see
    keys 0..their own position (bottom-right causal); their keys must already be in the pools
    (paged_kv_append first). m_b = seq_lens[b] is a prefill, m_b < seq_lens[b] an extend; rows
    from cu_q_lens[B] to T are 0 (static-shape padding). max_q_len: an optional upper bound of
    the m_b that the GPU kernels size their launch by (default T; no device sync either way;
    a smaller value only makes them loop). Options as in paged_attention_decode.
    """
    _, fn = resolve("paged_attention_prefill", q.device, backend)
    return fn(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens, max_q_len=max_q_len, scale=scale,
              softcap=softcap, window=window, alibi_slopes=alibi_slopes)


def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              w_gate_up: torch.Tensor, w_down: torch.Tensor, *, activation: str = "silu",
              backend: Optional[str] = None) -> torch.Tensor:
    """A mixture-of-experts MLP on routed tokens: hidden [T, H], topk_ids [T, k] (int, each in
    [0, E); the caller's router chose them), topk_weights [T, k] (any float dtype, used in fp32),
    w_gate_up [E, 2I, H] ([gate | up] rows per expert, transformers 5's fused layout), w_down
    [E, H, I] -> [T, H] = sum_j topk_weights[t, j] * down_e(act(gate_e(x)) * up_e(x)),
    e = topk_ids[t, j]. activation: "silu". Differentiable (the triton backend runs calls that
    need gradients on the reference); the cuda backend has no kernel and lists it in FALLBACK_OPS.
    """
    _, fn = resolve("fused_moe", hidden.device, backend)
    return fn(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation=activation)
