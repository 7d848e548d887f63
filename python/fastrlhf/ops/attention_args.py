"""Checks and derived forms of the optional attention arguments (window, alibi_slopes, cu_seqlens).

Shared by every backend, so a bad argument gets the same one-line error wherever it goes. The
semantics are those of `fastrlhf.ops.reference.attention_prefill` / `attention_decode`:

- `window` (int >= 1): a query at column p sees keys at columns k with p - window < k <= p.
- `alibi_slopes` (float [Hq]): score(i, j) += slope[h] * (col_j - col_i), after the softcap and
  before the masks; constants (not differentiated).
- `cu_seqlens` (int [N + 1]): packed sequences in one row of q/k/v ([1, H, T, D]); sequence n
  is tokens cu_seqlens[n] .. cu_seqlens[n + 1] - 1, and a token attends only to its own
  sequence. cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] <= T (tokens after the last
  boundary belong to no sequence: their outputs are 0).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch


def check_window(window) -> Optional[int]:
    """The window as an int, or None; a clear error for anything else."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or int(window) < 1:
        raise ValueError(f"window must be a positive int (keys a query sees, itself included) or None; "
                         f"got {window!r}")
    return int(window)


def check_alibi(alibi_slopes: Optional[torch.Tensor], n_heads: int, device) -> None:
    if alibi_slopes is None:
        return
    if not torch.is_tensor(alibi_slopes) or not alibi_slopes.is_floating_point() \
            or tuple(alibi_slopes.shape) != (n_heads,):
        got = (f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}" if torch.is_tensor(alibi_slopes)
               else type(alibi_slopes).__name__)
        raise ValueError(f"alibi_slopes must be a float tensor of shape [{n_heads}] (one slope per query "
                         f"head); got {got}")
    if alibi_slopes.device != torch.device(device):
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but the attention runs on {device}; "
                         "move the slopes to that device")


def check_causal_window(causal: bool, window: Optional[int]) -> None:
    if window is not None and not causal:
        raise ValueError("window (sliding-window attention) is defined for causal attention only; "
                         "pass causal=True or window=None")


def check_packed(q: torch.Tensor, k: torch.Tensor, attention_mask, cu_seqlens) -> None:
    """Shape/dtype checks of a packed call, and (outside torch.compile tracing) the boundary values."""
    if cu_seqlens is None:
        return
    if not torch.is_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [num_sequences + 1] of cumulative "
                         f"sequence lengths; got {cu_seqlens!r:.80}")
    if q.shape[0] != 1:
        raise ValueError(f"packed attention (cu_seqlens) takes the sequences packed into ONE row: q must be "
                         f"[1, H, total_tokens, D]; got batch {q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"packed attention needs as many queries as keys (self-attention over the packed "
                         f"row); got {q.shape[2]} queries, {k.shape[2]} keys")
    if attention_mask is not None:
        raise ValueError("pass either cu_seqlens (packed sequences) or attention_mask (padding), not both")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if torch.compiler.is_compiling():
        return  # the value checks read the tensor (a device sync; a graph break under compile)
    total = q.shape[2]
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    bad = (cu_seqlens[0] != 0) | (steps < 0).any() | (cu_seqlens[-1] > total)
    if bool(bad):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at most at the packed length "
                         f"{total}; got {cu_seqlens.tolist()[:16]}{' ...' if cu_seqlens.numel() > 16 else ''}")


def packed_key_ranges(cu_seqlens: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(seq_start, seq_end): int32 [total], the token range of each token's own sequence.

    Token t of sequence n gets (cu_seqlens[n], cu_seqlens[n + 1]); a token after the last boundary
    gets (total, total), an empty range. No device sync (graph-capturable)."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=cu.device)
    # the sequence of token t is the last n with cu[n] <= t (zero-length sequences are skipped)
    seq = torch.searchsorted(cu, tokens, right=True) - 1
    inside = tokens < cu[-1]
    last = cu.numel() - 2
    seq = seq.clamp(0, last)
    start = torch.where(inside, cu[seq], total)
    end = torch.where(inside, cu[seq + 1], total)
    return start.to(torch.int32), end.to(torch.int32)
