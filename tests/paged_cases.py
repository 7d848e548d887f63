"""Inputs of the paged KV-cache op tests (reference, interpreter, GPU) and a naive float64
implementation of their semantics, written token by token, to check the reference against.

`paged_case` builds pools whose blocks are handed out in shuffled order, with every pool row
that no sequence owns (free blocks, the tail of each sequence's last block) set to NaN, and
block-table entries past a sequence's last block pointing at a NaN block or -1: an op that
reads anything it should not turns the output NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class PagedCase:
    q: torch.Tensor             # [T, Hq, D] (prefill) or [B, Hq, D] (decode)
    k_pool: torch.Tensor        # [num_blocks, Hkv, block_size, D]
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor      # int32 [B]
    cu_q_lens: torch.Tensor     # int32 [B + 1]
    k_seqs: List[torch.Tensor]  # per sequence, its keys [Hkv, seq_len, D] as written
    v_seqs: List[torch.Tensor]

    def tensors(self):
        return self.q, self.k_pool, self.v_pool, self.block_tables

    def to(self, device):
        moved = {name: getattr(self, name).to(device) for name in
                 ("q", "k_pool", "v_pool", "block_tables", "seq_lens", "cu_q_lens")}
        return PagedCase(**moved, k_seqs=self.k_seqs, v_seqs=self.v_seqs)


def paged_case(seq_lens, *, q_lens=None, hq: int = 4, hkv: int = 2, d: int = 32, block_size: int = 16,
               dtype=torch.float32, seed: int = 0, spare_blocks: int = 3, extra_columns: int = 2,
               q_rows: Optional[int] = None, amp: float = 1.0, device="cpu") -> PagedCase:
    """Sequences of `seq_lens` tokens in shuffled pool blocks. q_lens=None: a decode case (one
    query per sequence, q [B, Hq, D]); else prefill/extend with q_lens[b] queries per sequence
    packed in q [q_rows or sum(q_lens), Hq, D]. amp scales q and k (large scores for softcap).
    Built on the CPU, then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_pool = torch.full((num_blocks, hkv, block_size, d), float("nan"), dtype=dtype)
    v_pool = torch.full_like(k_pool, float("nan"))
    width = max(needed + [0]) + extra_columns
    spare = order[sum(needed):]
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    k_seqs, v_seqs, at = [], [], 0
    for b, (n, nb) in enumerate(zip(seq_lens, needed)):
        blocks = order[at:at + nb]
        at += nb
        tables[b, :nb] = torch.tensor(blocks, dtype=torch.int32)
        if spare and nb < width:  # a table entry past the sequence's blocks names a NaN block
            tables[b, nb] = spare[b % len(spare)]
        k = (torch.randn(hkv, n, d, generator=g) * amp).to(dtype)
        v = torch.randn(hkv, n, d, generator=g).to(dtype)
        pos = torch.arange(n)
        where = torch.tensor(blocks, dtype=torch.long)[pos // block_size], pos % block_size
        k_pool[where[0], :, where[1]] = k.transpose(0, 1)
        v_pool[where[0], :, where[1]] = v.transpose(0, 1)
        k_seqs.append(k)
        v_seqs.append(v)
    if q_lens is None:
        q = (torch.randn(len(seq_lens), hq, d, generator=g) * amp).to(dtype)
        cu = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    else:
        cu = torch.tensor([0] + list(q_lens), dtype=torch.int64).cumsum(0).to(torch.int32)
        rows = int(cu[-1]) if q_rows is None else q_rows
        q = (torch.randn(rows, hq, d, generator=g) * amp).to(dtype)
    case = PagedCase(q, k_pool, v_pool, tables, torch.tensor(seq_lens, dtype=torch.int32), cu, k_seqs, v_seqs)
    return case if torch.device(device).type == "cpu" else case.to(device)


def naive_attention(case: PagedCase, *, decode: bool, scale=None, softcap=None, window=None,
                    alibi_slopes=None) -> torch.Tensor:
    """The contract evaluated literally in float64, one query row and head at a time, from the
    keys as written (not from the pools)."""
    q = case.q.double()
    hq, d = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    cu = case.cu_q_lens.tolist()
    for b, n in enumerate(case.seq_lens.tolist()):
        k, v = case.k_seqs[b].double(), case.v_seqs[b].double()
        group = hq // k.shape[0]
        m = 1 if decode else cu[b + 1] - cu[b]
        for i in range(m):
            row, pos = (b, n - 1) if decode else (cu[b] + i, n - m + i)
            lo = 0 if window is None else max(0, pos - window + 1)
            if pos < 0 or lo > pos:
                continue
            for h in range(hq):
                keys = k[h // group, lo:pos + 1]
                s = keys @ q[row, h] * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if alibi_slopes is not None:
                    s = s + float(alibi_slopes[h]) * (torch.arange(lo, pos + 1, dtype=torch.float64) - pos)
                out[row, h] = torch.softmax(s, 0) @ v[h // group, lo:pos + 1]
    return out


def alibi(hq: int) -> torch.Tensor:
    """Bloom-style slopes 2^(-8(h+1)/Hq), fp32 [Hq]."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)], dtype=torch.float32)
