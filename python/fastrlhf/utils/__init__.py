"""Helpers shared by every trainer: process-group setup (`distributed`) and rank-aware
logging, tensorboard and progress bars (`logging`)."""
from .distributed import (all_gather_cat, all_ranks_true, all_reduce_max, all_reduce_sum, barrier, get_local_rank,
                          get_rank, get_world_size, init_distributed, is_rank0, mean_over_ranks)
from .logging import MetricsLogger, get_logger, print_rank0, progress_bar

__all__ = ["init_distributed", "get_rank", "get_local_rank", "get_world_size", "is_rank0", "barrier",
           "all_reduce_sum", "all_reduce_max", "all_ranks_true", "all_gather_cat", "mean_over_ranks",
           "get_logger", "print_rank0", "progress_bar", "MetricsLogger"]
