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


def json_safe(obj):
    """`obj` with every NaN/inf float replaced by None, so that json.dump writes valid JSON (null)."""
    import math
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class MetricsLogger:
    """Scalars to tensorboard (rank 0 only) plus a JSONL copy that tests and scripts can read.

    metrics.jsonl holds the current run only: `begin(None)` (a fresh run) empties it,
    `begin(step)` (a run resumed at `step`) keeps the rows up to that step and appends after them.
    A NaN/inf value is written as null (the file stays valid JSON Lines)."""

    def __init__(self, log_dir: Optional[str]):
        self.log_dir = log_dir if log_dir and is_rank0() else None
        self.writer = None
        self.jsonl = None
        self._begun = False

    @property
    def begun(self) -> bool:
        return self._begun

    def begin(self, resumed_at: Optional[int] = None) -> None:
        import json
        self._begun = True
        if self.log_dir is None:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "metrics.jsonl")
        kept = []
        if resumed_at is not None and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resumed_at:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, AttributeError):  # a line cut short by a killed run
                        pass
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: tensorboard hides the events a killed run logged after the checkpoint
            self.writer = SummaryWriter(self.log_dir, purge_step=None if resumed_at is None else resumed_at + 1)
        except ImportError:  # tensorboard is optional at runtime
            get_logger().warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if not self._begun:
            self.begin(None)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.jsonl is not None:
            import json
            row = json_safe({"step": step, **{k: float(v) for k, v in metrics.items()}})
            self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.writer = self.jsonl = None
