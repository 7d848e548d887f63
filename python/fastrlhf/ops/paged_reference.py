"""The `torch` backend of the paged KV-cache ops, and the input checks every backend shares.

Paged layout (one pool pair per layer):
- `k_pool, v_pool [num_blocks, Hkv, block_size, D]`: fixed-size blocks of keys/values;
- `block_tables [B, max_blocks]` (int32): the pool blocks of sequence b, in order; token at
  position p of sequence b lives in block `block_tables[b, p // block_size]`, row
  `p % block_size`. Entries past a sequence's last block are never read (any value);
- `seq_lens [B]` (int32): tokens of each sequence in the cache, the new ones included. A
  sequence starts at position 0 of its first block (no left padding); seq_len 0 is allowed
  (an empty row: its outputs are 0).
- `slot_mapping [T]`: where paged_kv_append writes token t: `block * block_size + offset`;
  slots < 0 are skipped (padding rows of a static-shape batch).

Attention scores follow the shared attention contract: s = (q . k) * scale -> softcap ->
+ alibi -> masks (causal, window, the sequence's length) -> softmax. A query at position p
sees keys k with max(0, p - window + 1) <= k <= p. Rows that see no key give 0, never NaN.
Keys and values outside what a row sees are never used, so whatever an unused pool block
holds (NaN included) cannot leak into an output.

These implementations compute in fp32 (fp64 for fp64 inputs), gather the blocks they need
once per call (per sequence in prefill), and are differentiable in q and the pools: the GPU
backends send calls that need gradients here.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .attention_args import check_alibi, check_window

_INT_TYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


# ------------------------------------------------------------------ checks (every backend)
def _check_int(name: str, t: torch.Tensor, op: str, shape: Tuple[int, ...]) -> None:
    if not torch.is_tensor(t) or t.dtype not in _INT_TYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor (int32), got "
                        f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor, op: str) -> Tuple[int, int, int, int]:
    """(num_blocks, Hkv, block_size, D) of a valid pool pair, else a clear error."""
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"{op}: k_pool and v_pool must be equal [num_blocks, Hkv, block_size, D]; got "
                         f"{list(k_pool.shape)} and {list(v_pool.shape)}")
    if k_pool.dtype != v_pool.dtype or k_pool.device != v_pool.device:
        raise TypeError(f"{op}: k_pool and v_pool must share dtype and device; got {k_pool.dtype} on "
                        f"{k_pool.device} and {v_pool.dtype} on {v_pool.device}")
    return tuple(k_pool.shape)


def check_options(op: str, q: torch.Tensor, softcap, window, alibi_slopes) -> None:
    """softcap, window and alibi_slopes as in the dense attention ops (their shared checks)."""
    if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0):
        raise ValueError(f"{op}: softcap must be a positive finite number or None, got {softcap!r}")
    try:
        check_window(window)
        check_alibi(alibi_slopes, q.shape[1], q.device)
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None


def check_attention(op: str, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, softcap, window, alibi_slopes) -> None:
    """Shapes and dtypes of a paged attention call; on CPU tensors also the values (on a GPU
    that would cost a device sync per call; the kernels there skip block ids outside the pool)."""
    if q.dim() != 3:
        raise ValueError(f"{op} expects q as [B, Hq, D] (decode) or [T, Hq, D] (prefill: the tokens of "
                         f"all sequences packed), got {list(q.shape)}")
    if not torch.is_tensor(seq_lens) or seq_lens.dim() != 1:
        raise ValueError(f"{op}: seq_lens must be an int tensor [B], got "
                         f"{list(seq_lens.shape) if torch.is_tensor(seq_lens) else seq_lens!r}")
    n_seqs = seq_lens.shape[0]
    num_blocks, hkv, block_size, d = check_pools(k_pool, v_pool, op)
    hq = q.shape[1]
    if q.shape[-1] != d:
        raise ValueError(f"{op}: q's head dim {q.shape[-1]} != the pools' {d}")
    if hq % hkv:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of the pools' KV heads ({hkv})")
    if q.dtype != k_pool.dtype:
        raise TypeError(f"{op}: q ({q.dtype}) and the pools ({k_pool.dtype}) must share a dtype (cast q)")
    if block_tables.dim() != 2:
        raise ValueError(f"{op}: block_tables must be [B, max_blocks], got {list(block_tables.shape)}")
    _check_int("block_tables", block_tables, op, (n_seqs, block_tables.shape[1]))
    _check_int("seq_lens", seq_lens, op, (n_seqs,))
    check_options(op, q, softcap, window, alibi_slopes)
    if seq_lens.device.type == "cpu" and block_tables.device.type == "cpu" and n_seqs:
        lens = seq_lens.long()
        capacity = block_tables.shape[1] * block_size
        if int(lens.min()) < 0 or int(lens.max()) > capacity:
            raise ValueError(f"{op}: seq_lens must be in [0, max_blocks * block_size = {capacity}]; got "
                             f"{lens.tolist()}")
        used = torch.arange(block_tables.shape[1])[None, :] < (lens[:, None] + block_size - 1) // block_size
        ids = block_tables.long()[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ValueError(f"{op}: block_tables name blocks outside the pool [0, {num_blocks}) for the "
                             "sequences' tokens")


def check_cu_q_lens(op: str, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor, n_tokens: int,
                    max_q_len: Optional[int]) -> None:
    _check_int("cu_q_lens", cu_q_lens, op, (seq_lens.shape[0] + 1,))
    if max_q_len is not None and (isinstance(max_q_len, bool) or int(max_q_len) != max_q_len or max_q_len < 1):
        raise ValueError(f"{op}: max_q_len must be a positive int or None, got {max_q_len!r}")
    if cu_q_lens.device.type == "cpu" and seq_lens.device.type == "cpu":
        cu = cu_q_lens.long()
        q_lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((q_lens < 0).any()) or int(cu[-1]) > n_tokens:
            raise ValueError(f"{op}: cu_q_lens must start at 0, never decrease and end at most at T = "
                             f"{n_tokens}; got {cu.tolist()}")
        if bool((q_lens > seq_lens.long()).any()):
            raise ValueError(f"{op}: a sequence has more queries than tokens in the cache (cu_q_lens "
                             f"{cu.tolist()}, seq_lens {seq_lens.tolist()}); append its keys first")


def check_append(k_pool, v_pool, k, v, slot_mapping) -> None:
    op = "paged_kv_append"
    num_blocks, hkv, block_size, d = check_pools(k_pool, v_pool, op)
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (hkv, d):
        raise ValueError(f"{op}: k and v must be [T, Hkv={hkv}, D={d}]; got {list(k.shape)} and {list(v.shape)}")
    _check_int("slot_mapping", slot_mapping, op, (k.shape[0],))
    if slot_mapping.device.type == "cpu" and k.shape[0]:
        top = int(slot_mapping.max())
        if top >= num_blocks * block_size:
            raise ValueError(f"{op}: slot {top} is outside the pool (num_blocks * block_size = "
                             f"{num_blocks * block_size}); slots are block * block_size + offset")


# ------------------------------------------------------------------ helpers
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _gather_blocks(pool: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pool [N, Hkv, bs, D] at block ids [B, nb] -> [B, nb, Hkv, bs, D] in `dtype`. Whole blocks
    are gathered as rows (index_select: a memcpy per block; advanced indexing is several times
    slower on the CPU); ids outside the pool are clamped (their rows are masked by the caller)."""
    n = pool.shape[0]
    rows = pool.reshape(n, -1).index_select(0, blocks.reshape(-1).clamp(0, n - 1))
    return rows.view(*blocks.shape, *pool.shape[1:]).to(dtype)


def _gather(pool: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocks as keys [Hkv, B, nb * bs, D], the layout of _attend's batched products."""
    g = _gather_blocks(pool, blocks, dtype).permute(2, 0, 1, 3, 4)  # [Hkv, B, nb, bs, D]
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _decode_blocks(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, lens: torch.Tensor, scale: float,
                   softcap, window, alibi_slopes) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] at position lens[b] - 1, over its gathered blocks
    kb, vb [B, nb, Hkv, bs, D] as they come (no transpose: decode reads every key once, so a
    copy into another layout would cost as much as the attention): scores per block
    [B, nb, Hkv, G, bs], softmax over (blocks, rows), P·V per block summed over blocks."""
    b, hq, d = q.shape
    _, nb, hkv, bs, _ = kb.shape
    group = hq // hkv
    kp = torch.arange(nb * bs, device=q.device).view(1, nb, 1, 1, bs)
    qp = (lens - 1).view(b, 1, 1, 1, 1)
    visible = kp <= qp  # also hides every row at or past the sequence's length
    if window is not None:
        visible = visible & (kp > qp - window)
    # rows it does not see (NaN, anything) must not reach the output: see _attend
    vb = vb.masked_fill_(~visible.view(b, nb, 1, bs, 1), 0)  # in place: our own gathered copy
    if torch.is_grad_enabled() and (q.requires_grad or kb.requires_grad):
        kb = kb.masked_fill(~visible.view(b, nb, 1, bs, 1), 0)
    scores = torch.matmul(q.view(b, 1, hkv, group, d), kb.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(scores).view(1, 1, hkv, group, 1) * (kp - qp).to(scores)
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=(1, 4), keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    denom = p.sum(dim=(1, 4), keepdim=True)[:, 0]              # [B, Hkv, G, 1]
    out = torch.matmul(p, vb).sum(1) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(b, hq, d)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, lens: torch.Tensor,
            scale: float, softcap, window, alibi_slopes) -> torch.Tensor:
    """q [B, Hq, M, D] at positions q_pos [B, M] (< 0: a row that sees nothing) over keys and
    values [Hkv, B, L, D] (from _gather) at positions 0..L-1, of which the first lens[b] exist
    -> [B, Hq, M, D]. Computed per KV head with its query group stacked: [Hkv, B, G, M, L]."""
    b, hq, m, d = q.shape
    hkv, length = k.shape[0], k.shape[2]
    group = hq // hkv
    qp = q_pos[None, :, None, :, None]                        # [1, B, 1, M, 1]
    kp = torch.arange(length, device=q.device)                # broadcasts as [..., L]
    exists = kp < lens[:, None]                               # [B, L]
    visible = exists[None, :, None, None, :] & (kp <= qp) & (qp >= 0)
    if window is not None:
        visible = visible & (kp > qp - window)
    # Pool rows past a sequence's end (NaN, anything) must not reach the output: their scores
    # are masked below, and their values zeroed here (0 * NaN would be NaN). The keys need the
    # same only when gradients flow (a masked score's zero gradient times a NaN key is NaN).
    v = v.masked_fill_(~exists[None, :, :, None], 0)  # in place: v is our own gathered copy
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        k = k.masked_fill(~exists[None, :, :, None], 0)
    qg = q.reshape(b, hkv, group * m, d).transpose(0, 1)      # [Hkv, B, G*M, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(hkv, b, group, m, length) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores).view(hkv, 1, group, 1, 1)
        scores = scores + slopes * (kp - qp).to(scores)
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p.view(hkv, b, group * m, length), v)  # [Hkv, B, G*M, D]
    return out.transpose(0, 1).reshape(b, hq, m, d)


def _blocks_for(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


# ------------------------------------------------------------------ ops
def paged_kv_append(k_pool, v_pool, k, v, slot_mapping):
    """Write token t's k[t], v[t] ([T, Hkv, D]) at slot_mapping[t] = block * block_size + offset
    of the pools, in place; slots < 0 are skipped. Returns (k_pool, v_pool)."""
    check_append(k_pool, v_pool, k, v, slot_mapping)
    block_size = k_pool.shape[2]
    slots = slot_mapping.to(k_pool.device).long()
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    # advanced indices on dims 0 and 2: the selected layout is [n, Hkv, D], that of k[keep]
    k_pool[blocks, :, offsets] = k[keep].to(k_pool.dtype)
    v_pool[blocks, :, offsets] = v[keep].to(v_pool.dtype)
    return k_pool, v_pool


def paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, *, scale=None, softcap=None,
                           window=None, alibi_slopes=None):
    """One query per sequence, at position seq_lens[b] - 1, over the sequence's keys: [B, Hq, D]."""
    check_attention("paged_attention_decode", q, k_pool, v_pool, block_tables, seq_lens, softcap, window,
                    alibi_slopes)
    b = q.shape[0]
    if seq_lens.shape[0] != b:
        raise ValueError(f"paged_attention_decode: seq_lens has {seq_lens.shape[0]} entries for {b} queries")
    dtype = _compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lens = seq_lens.to(q.device).long()
    n_blocks = _blocks_for(int(lens.max()), k_pool.shape[2]) if b else 0
    if n_blocks == 0:
        return torch.zeros_like(q)
    blocks = block_tables.to(q.device).long()[:, :n_blocks]
    kb, vb = _gather_blocks(k_pool, blocks, dtype), _gather_blocks(v_pool, blocks, dtype)
    return _decode_blocks(q.to(dtype), kb, vb, lens, scale, softcap, window, alibi_slopes).to(q.dtype)


def paged_attention_prefill(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens, *, max_q_len=None,
                            scale=None, softcap=None, window=None, alibi_slopes=None):
    """Ragged queries q [T, Hq, D]: rows cu_q_lens[b]:cu_q_lens[b+1] are sequence b's last m_b
    positions seq_lens[b]-m_b .. seq_lens[b]-1, over its keys 0..seq_lens[b]-1 (bottom-right
    causal). Rows from cu_q_lens[B] on are 0. max_q_len is a launch hint of the GPU kernels."""
    check_attention("paged_attention_prefill", q, k_pool, v_pool, block_tables, seq_lens, softcap, window,
                    alibi_slopes)
    check_cu_q_lens("paged_attention_prefill", cu_q_lens, seq_lens, q.shape[0], max_q_len)
    dtype = _compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_size = k_pool.shape[2]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    cu, lens = cu_q_lens.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        m = cu[b + 1] - cu[b]
        if m == 0:
            continue
        blocks = block_tables[b:b + 1, :_blocks_for(length, block_size)].to(q.device).long()
        k, v = _gather(k_pool, blocks, dtype), _gather(v_pool, blocks, dtype)
        q_b = q[cu[b]:cu[b + 1]].to(dtype).transpose(0, 1)[None]          # [1, Hq, m, D]
        q_pos = torch.arange(length - m, length, device=q.device)[None]
        lens_b = torch.tensor([length], device=q.device)
        out[cu[b]:cu[b + 1]] = _attend(q_b, k, v, q_pos, lens_b, scale, softcap, window,
                                       alibi_slopes)[0].transpose(0, 1)
    return out.to(q.dtype)


def paged_slot_mapping(block_tables: torch.Tensor, cu_q_lens: torch.Tensor, seq_lens: torch.Tensor,
                       block_size: int, num_tokens: int) -> torch.Tensor:
    """The slot of every packed token (the `slot_mapping` of paged_kv_append) for the layout of
    paged_attention_prefill: row t of sequence b is position seq_lens[b] - m_b + (t - cu_q_lens[b]).
    Rows from cu_q_lens[B] to num_tokens get -1 (skipped). int64 [num_tokens]; no device sync."""
    device = block_tables.device
    cu = cu_q_lens.to(device).long()
    t = torch.arange(num_tokens, device=device)
    seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, max(cu.numel() - 2, 0))
    lens = seq_lens.to(device).long()
    pos = lens[seq] - (cu[seq + 1] - cu[seq]) + (t - cu[seq])
    live = t < cu[-1]
    pos = torch.where(live, pos, 0)
    block = block_tables.long()[seq, pos // block_size]
    return torch.where(live, block * block_size + pos % block_size, -1)
