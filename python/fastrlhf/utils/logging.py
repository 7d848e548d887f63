"""Rank-aware logging: only rank 0 prints, draws progress bars and writes metrics (metrics.jsonl and
the trackers of --report_to)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

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
    """Scalars to metrics.jsonl (which tests and scripts read) and to each tracker of `report_to`
    (`utils/trackers.py`: tensorboard by default, wandb, mlflow), rank 0 only.

    metrics.jsonl holds the current run only: `begin(None)` (a fresh run) empties it,
    `begin(step)` (a run resumed at `step`) keeps the rows up to that step and appends after them.
    A NaN/inf value is written as null (the file stays valid JSON Lines). `run_config` (the run's
    options) goes to the trackers that keep one; `output_dir` names their run and holds their files."""

    def __init__(self, log_dir: Optional[str], report_to: Sequence[str] = ("tensorboard",),
                 run_config: Optional[Dict] = None, output_dir: Optional[str] = None):
        self.log_dir = log_dir if log_dir and is_rank0() else None
        self.report_to = [name for name in report_to if name != "none"]
        self.run_config, self.output_dir = run_config, output_dir
        self.trackers: List = []
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
        from .trackers import open_trackers
        self.trackers = open_trackers(self.report_to, self.log_dir, resumed_at, self.run_config, self.output_dir)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if not self._begun:
            self.begin(None)
        for tracker in self.trackers:
            tracker.log(metrics, step)
        if self.jsonl is not None:
            import json
            row = json_safe({"step": step, **{k: float(v) for k, v in metrics.items()}})
            self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.trackers, self.jsonl = [], None
