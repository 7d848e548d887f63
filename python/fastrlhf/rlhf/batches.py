"""The order of the data and the eval set's shards.

- `GlobalBatchSampler`: a seeded shuffle cut into global batches, each split into micro-batches
  per rank and accumulation step, with a resumable position. The global batch of step k is the
  same whatever the world size and accumulation, so 1- and 2-process runs see the same data.
- `eval_batches` / `eval_sums`: the eval set sharded over ranks with equal batch counts (ZeRO-3
  forwards are collective), filler batches weighted 0, per-batch sums reduced over ranks.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError
from ..utils.distributed import all_reduce_sum

if TYPE_CHECKING:
    from .run_setup import RunContext


class GlobalBatchSampler:
    """Micro-batches of indices for one rank: permutation(seed, epoch) -> global batches (last
    partial one dropped) -> each split into accumulation x world micro-batches, micro-batch
    (a * world + rank) going to this rank at accumulation step a. `next_step()` walks the epochs;
    its position (`state_dict`) is all a resume needs."""

    def __init__(self, num_items: int, micro: int, accumulation: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, what: str = "the training set", fix: str = "lower "
                 "--global_batch_size/--micro_batch_size or add data"):
        self.num_items, self.micro, self.accum, self.world, self.rank = num_items, micro, accumulation, world, rank
        self.global_batch = micro * accumulation * world
        self.seed, self.shuffle = seed, shuffle
        if num_items < self.global_batch:
            raise ConfigError(f"{what} has {num_items} examples, fewer than one global batch "
                             f"({self.global_batch}); {fix}")
        self.epoch, self.micro_in_epoch = 0, 0
        self._order: Tuple[int, List[int]] = (-1, [])

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + 100_003 * epoch)
            self._order = (epoch, torch.randperm(self.num_items, generator=g).tolist())
        return self._order[1]

    def next_step(self) -> List[List[int]]:
        """This rank's `accumulation` micro-batches of the next optimizer step."""
        if self.micro_in_epoch >= self.micro_batches_per_epoch:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        out = []
        for i in range(self.micro_in_epoch, self.micro_in_epoch + self.accum):
            step, a = divmod(i, self.accum)
            chunk = step * self.global_batch + (a * self.world + self.rank) * self.micro
            out.append(order[chunk:chunk + self.micro])
        self.micro_in_epoch += self.accum
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.micro_in_epoch = state["epoch"], state["micro_in_epoch"]


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def eval_batches(dataset, collate: Callable, batch_size: int, rank: int, world: int,
                 max_batches: Optional[int] = None):
    """Yield (batch, weight) with the same number of batches on every rank; weight 0 marks filler."""
    n = len(dataset)
    if n == 0:
        return
    mine = list(range(rank, n, world))
    per_rank = math.ceil(math.ceil(n / world) / batch_size)
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for b in range(per_rank):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        if idx:
            yield collate([dataset[i] for i in idx]), 1.0
        else:  # this rank ran out: a throwaway batch keeps the collective forwards in step
            yield collate([dataset[0]]), 0.0


@torch.no_grad()
def eval_sums(model, dataset, collate: Callable, batch_size: int, ctx: RunContext, max_batches: Optional[int],
              batch_sums: Callable[[Dict[str, Any]], List[float]], size: int) -> List[float]:
    """Sum of `batch_sums(batch)` (`size` numbers per batch, on the device) over the eval set of
    every rank, with `model` in eval mode meanwhile. Each trainer turns the sums into its metrics."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(size, dtype=torch.float64)
    for batch, weight in eval_batches(dataset, collate, batch_size, ctx.rank, ctx.world_size, max_batches):
        sums += weight * torch.tensor(batch_sums(to_device(batch, ctx.device)), dtype=torch.float64)
    if was_training:
        model.train()
    return all_reduce_sum(sums).tolist()


def total_train_steps(cfg, steps_per_epoch: int) -> int:
    total = cfg.num_epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total
