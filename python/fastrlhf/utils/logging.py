"""Rank-aware logging: only rank 0 prints, draws progress bars and writes tensorboard events."""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict, Optional

from .distributed import is_rank0

_LOGGER_NAME = "fastrlhf"


class _CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest capture, notebooks, redirections)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def get_logger() -> logging.Logger:
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = _CurrentStdoutHandler()
        handler.setFormatter(logging.Formatter("[fastrlhf %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def quiet_libraries() -> None:
    """Silence per-file progress bars and info chatter from HF/DeepSpeed; our own bar is enough."""
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def print_rank0(msg: str) -> None:
    if is_rank0():
        get_logger().info(msg)


def progress_bar(total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0; a silent stand-in elsewhere (and when FASTRLHF_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm
    disable = not is_rank0() or os.environ.get("FASTRLHF_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True, leave=True)


class MetricsLogger:
    """Scalars to tensorboard (rank 0 only) plus a JSONL copy that tests and scripts can read."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        self.jsonl = None
        if log_dir and is_rank0():
            os.makedirs(log_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir)
            except ImportError:  # tensorboard is optional at runtime
                get_logger().warning("tensorboard is not installed; metrics go to metrics.jsonl only")
            self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.jsonl is not None:
            import json
            self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.writer = self.jsonl = None
