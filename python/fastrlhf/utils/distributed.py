"""Process-group setup that works with `deepspeed`, `torchrun`, or no launcher at all.

Without a launcher (plain `python` / `fastrlhf train`) we create a 1-process group ourselves,
because `deepspeed.initialize` needs one; on a CPU-only machine the backend is gloo.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: Optional[str] = None) -> torch.device:
    """Join (or create) the process group; returns this process's device."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            # no launcher: a single process group on localhost
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend or default_backend(), auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(get_local_rank())
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not _multi():
        return t.clone()
    out = t.to(_comm_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as a new tensor on t's device; a copy for one process."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def mean_over_ranks(value: float) -> float:
    return all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64)).item() / get_world_size()


def all_ranks_true(flag: bool) -> bool:
    """True only when `flag` holds on every rank (so every rank takes the same branch)."""
    return all_reduce_max(torch.tensor([0.0 if flag else 1.0])).item() == 0.0


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on each), concatenated along dim 0 in rank order."""
    if not _multi():
        return t
    x = t.to(_comm_device()).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


_TP_GROUPS: dict = {}


def tensor_parallel_group(size: int, backend: Optional[str] = None):
    """This rank's process group of `size` consecutive ranks (rank // size-th of world / size).
    `dist.new_group` is collective, so every rank creates every group, once per (size, backend)
    and default group; later calls return the cached one."""
    world = dist.get_world_size()
    if world % size:
        raise ValueError(f"a group size of {size} does not divide the world size {world}")
    key = (size, backend, id(dist.group.WORLD))
    if key not in _TP_GROUPS:
        mine = None
        for start in range(0, world, size):
            g = dist.new_group(list(range(start, start + size)), backend=backend)
            if start <= dist.get_rank() < start + size:
                mine = g
        _TP_GROUPS[key] = mine
    return _TP_GROUPS[key]
