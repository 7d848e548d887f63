"""The paged KV cache: one pool of fixed-size blocks for all sequences, a block table each.

Layout (the paged ops' contract, `fastrlhf.ops.paged_reference`): per layer k, v pools
[num_blocks, Hkv, block_size, D]; the token at position p of a sequence lives in block
`blocks[p // block_size]`, row `p % block_size`. All layers share one allocation
[L, 2, num_blocks, Hkv, block_size, D], so a block id means the same rows in every layer and
copying a block (copy on write) is one strided copy.

`BlockAllocator` is the host-side bookkeeping: a free list and a reference count per block.
Sequences that share a prefix (the answers of one prompt) hold the same block ids; a block is
free again when its last holder lets go. Nothing here knows about sequences.

Pool size (`pool_blocks`), in this order:
1. `EngineConfig(kv_cache_tokens=N)`: ceil(N / block_size) blocks, fixed: when the scheduler runs
   out, it preempts (re-queues) the newest sequences.
2. Otherwise the pool starts at the call's demand (every row that may decode at once at its
   longest) and grows (doubling, to what is needed) when the scheduler runs out; on a GPU it
   never exceeds `kv_cache_memory_fraction` of the memory free when it is (re)allocated plus the
   pool it replaces; at that cap the scheduler preempts instead.
"""
from __future__ import annotations

from typing import List, Optional

import torch


def blocks_for(n_tokens: int, block_size: int) -> int:
    return (n_tokens + block_size - 1) // block_size


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the scheduler preempts or grows)."""


class BlockAllocator:
    """Free list and reference counts of `num_blocks` blocks. `allocate` hands out the lowest
    free ids first (a deterministic layout, the same on every rank of a group)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: List[int] = [0] * num_blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> List[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def share(self, blocks: List[int]) -> None:
        """One more holder of each block (a sequence forked from another)."""
        for b in blocks:
            if self._refs[b] < 1:
                raise RuntimeError(f"block {b} is free; only held blocks can be shared")
            self._refs[b] += 1

    def free(self, blocks: List[int]) -> None:
        """One holder fewer of each block; a block nobody holds goes back to the free list."""
        for b in blocks:
            if self._refs[b] < 1:
                raise RuntimeError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def grow(self, num_blocks: int) -> None:
        """The pool now has `num_blocks` (more) blocks; existing ids keep their meaning."""
        self._free[:0] = list(range(num_blocks - 1, self.num_blocks - 1, -1))
        self._refs += [0] * (num_blocks - self.num_blocks)
        self.num_blocks = num_blocks


class PagedKVCache:
    """The block pool of every layer, and its allocator."""

    def __init__(self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # zeros, not empty: attention multiplies masked-out rows of a partly filled block by 0,
        # which must not meet a NaN left in uninitialised memory
        self.storage = torch.zeros((n_layers, 2, num_blocks, n_kv_heads, block_size, head_dim),
                                   dtype=dtype, device=device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.allocator = BlockAllocator(num_blocks)
        self._views()

    def _views(self) -> None:
        n_layers = self.storage.shape[0]
        self.k: List[torch.Tensor] = [self.storage[i, 0] for i in range(n_layers)]
        self.v: List[torch.Tensor] = [self.storage[i, 1] for i in range(n_layers)]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, keys and values."""
        s = self.storage
        return s[:, :, 0].numel() * s.element_size()

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def fits(self, n_layers: int, n_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> bool:
        """Same layout (a pool of another size can be grown or replaced)."""
        s = self.storage
        return (s.shape[0] == n_layers and s.shape[3] == n_kv_heads and s.shape[4] == block_size
                and s.shape[5] == head_dim and s.dtype == dtype and s.device == device)

    def grow(self, num_blocks: int) -> None:
        """More blocks, keeping every block's contents and id (one copy of the pool)."""
        if num_blocks <= self.num_blocks:
            return
        old = self.storage
        shape = list(old.shape)
        shape[2] = num_blocks
        self.storage = torch.zeros(shape, dtype=old.dtype, device=old.device)
        self.storage[:, :, :self.num_blocks].copy_(old)
        del old
        self.allocator.grow(num_blocks)
        self.num_blocks = num_blocks
        self._views()

    def copy_blocks(self, pairs: List[tuple]) -> None:
        """Copy whole blocks src -> dst in every layer (copy on write), for (src, dst) pairs."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.storage.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.storage.device)
        self.storage[:, :, dst] = self.storage[:, :, src]


def pool_blocks(kv_cache_tokens: Optional[int], block_size: int, demand_blocks: int) -> int:
    """The first pool's size: fixed by kv_cache_tokens, else the call's demand (see the module doc)."""
    if kv_cache_tokens is not None:
        return blocks_for(kv_cache_tokens, block_size)
    return max(1, demand_blocks)


def growth_cap_blocks(memory_fraction: float, block_bytes: int, current_blocks: int,
                      device: torch.device) -> Optional[int]:
    """The most blocks an elastic pool may have on this device (None: no cap, the CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return current_blocks + int(free * memory_fraction) // block_bytes
