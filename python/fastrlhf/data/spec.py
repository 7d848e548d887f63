"""DataSpec: what data to load and how to split, filter and tokenize it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fastrlhf.errors import DataError

OVERLONG_MODES = ("drop", "truncate")
# what `fastrlhf train` (the pipeline) splits each dataset by when no split_ratios is given;
# a step run alone (`fastrlhf sft`, ..., or the Python API) uses all of its data instead
PIPELINE_SPLIT_RATIOS = "2,4,4"


@dataclass
class DataSpec:
    paths: list[str] = field(default_factory=list)   # HF names or local files/dirs; [] = bundled default
    weights: list[float] | None = None    # per dataset: fraction of its rows to use (2.0 = twice)
    split_ratios: str | None = None       # shares for steps 1, 2, 3 ("2,4,4"); None = all rows to the step
    eval_fraction: float = 0.05           # held out of each step's share (unless a test split exists)
    seed: int = 1234
    # tokenized parts cached here, keyed by spec + tokenizer; not part of a run's fingerprint
    cache_dir: str | None = field(default=None, metadata={"fingerprint": False})
    max_prompt_len: int = 128
    max_answer_len: int = 128
    overlong: str = "drop"                # or "truncate" (prompt from the left, answer from the right)
    train_on_prompt: bool = False         # SFT loss on prompt tokens too (DeepSpeed-Chat style)
    max_samples: int | None = None        # cap on each step's train rows (quick runs, tests)

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        self.paths = [str(p) for p in self.paths]
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != max(len(self.paths), 1):
                raise DataError(f"DataSpec.weights has {len(self.weights)} entries for "
                                f"{len(self.paths)} paths; give one weight per path or weights=None")
            if any(not math.isfinite(w) or w < 0 for w in self.weights):
                raise DataError(f"DataSpec.weights must be finite and >= 0, got {self.weights}")
        self.step_ratios()  # validates split_ratios early
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"DataSpec.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.overlong not in OVERLONG_MODES:
            raise DataError(f"DataSpec.overlong must be one of {OVERLONG_MODES}, got {self.overlong!r}")
        for name in ("max_prompt_len", "max_answer_len"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"DataSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"DataSpec.max_samples must be >= 1 or None, got {self.max_samples}")
        if not 0 <= int(self.seed) < 2 ** 32:
            raise DataError(f"DataSpec.seed must be in [0, 2**32), got {self.seed}")

    def step_ratios(self) -> list[float] | None:
        """split_ratios as three fractions summing to 1; None when unset (each step gets all rows)."""
        if self.split_ratios is None:
            return None
        try:
            parts = [float(x) for x in str(self.split_ratios).split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or any(not math.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
            raise DataError(f"DataSpec.split_ratios must be three non-negative numbers with a positive "
                            f"sum, like '2,4,4' (or '10,0,0' to use all for SFT); got {self.split_ratios!r}")
        total = sum(parts)
        return [p / total for p in parts]

    def to_dict(self) -> dict:
        return asdict(self)
