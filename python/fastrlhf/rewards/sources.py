"""Reward sources and their weighted mix.

A run's reward is `sum_i w_i * r_i` over its sources, in this order: the step-2 reward model
(`--reward_model`, its scores computed by the trainer from the tokens), then each `--reward_fn`,
then each `--reward_url`; `--reward_weights` gives one weight per source (default all 1). A
sample that any source answers with None gets no reward: it is left out of the loss and counted.
Every source's answer is checked: a list of one finite number within float32 (or None) per
completion, else a RewardError naming the source.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import RewardError
from .spec import absolute_spec, spec_name

MODEL_SOURCE = "reward_model"
FLOAT32_MAX = 3.4028234663852886e38


def _short(x: Any, limit: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


def check_rewards(name: str, values: Any, n: int, prompts: Sequence[str] = ()) -> List[Optional[float]]:
    """`values` as n floats or None, or a RewardError naming the source and what is wrong."""
    what = "reward server" if name.startswith(("http://", "https://")) else "reward function"
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{what} {name} returned a {type(values).__name__} ({_short(values)}); it must "
                          f"return a list of {n} floats (or None for no reward), one per completion")
    if len(values) != n:
        raise RewardError(f"{what} {name} returned {len(values)} rewards for {n} completions; it must "
                          "return one per completion, in order")
    out: List[Optional[float]] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (str, bytes)) or not isinstance(v, numbers.Real):
            raise RewardError(f"{what} {name} returned {type(v).__name__} {_short(v)} as reward {i} "
                              f"(prompt {_short(prompts[i]) if i < len(prompts) else '?'}); rewards must be "
                              "numbers (float) or None")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"{what} {name} returned {f} as reward {i} (prompt "
                              f"{_short(prompts[i]) if i < len(prompts) else '?'}); return a finite number, or None "
                              "to leave the sample out of the loss")
        if abs(f) > FLOAT32_MAX:  # finite here, inf in the trainer's float32 tensors
            raise RewardError(f"{what} {name} returned {f:g} as reward {i} (prompt "
                              f"{_short(prompts[i]) if i < len(prompts) else '?'}), beyond float32 (|r| <= "
                              f"{FLOAT32_MAX:.3g}), where the trainer computes; scale the rewards down")
        out.append(f)
    return out


@dataclass
class RewardResult:
    total: List[Optional[float]]                    # weighted sum; None = no reward for that sample
    per_source: Dict[str, List[Optional[float]]] = field(default_factory=dict)

    def stats(self) -> Dict[str, float]:
        """reward_<source>_mean/_std (over samples that source scored) and rewardless_samples."""
        out: Dict[str, float] = {}
        for name, values in self.per_source.items():
            vals = [v for v in values if v is not None]
            mean = sum(vals) / len(vals) if vals else float("nan")
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            out[f"reward_{name}_mean"], out[f"reward_{name}_std"] = mean, math.sqrt(var)
        out["rewardless_samples"] = float(sum(v is None for v in self.total))
        return out

    def silent_sources(self) -> List[str]:
        """The sources that returned None for every sample (their fault when nothing is rewarded)."""
        return [name for name, values in self.per_source.items() if values and all(v is None for v in values)]


class RewardSet:
    """The run's reward sources. `compute(prompts, completions, columns, model_scores=None)`
    returns a RewardResult; `model_scores` are the reward model's (when the run has one)."""

    def __init__(self, sources: Sequence[tuple], weights: Optional[Sequence[float]] = None, has_model: bool = False):
        # sources: (name, callable) for functions and servers; the model source is implicit
        self.has_model = has_model
        self.sources = list(sources)
        names = ([MODEL_SOURCE] if has_model else []) + [n for n, _ in self.sources]
        self.names = _unique(names)
        weights = list(weights) if weights else [1.0] * len(self.names)
        if len(weights) != len(self.names):
            raise ValueError(f"--reward_weights has {len(weights)} values for {len(self.names)} reward sources "
                             f"({', '.join(self.names)})")
        self.weights = [float(w) for w in weights]

    @classmethod
    def from_config(cls, cfg, has_model: bool) -> "RewardSet":
        """Functions (each in its own worker process) and servers named by a PPOConfig."""
        from .http import HTTPReward
        from .worker import FunctionWorker
        sources: List[tuple] = []
        for spec in cfg.reward_fn or []:
            name = spec_name(spec)
            sources.append((name, FunctionWorker(absolute_spec(spec), name, cfg.reward_timeout)))
        for url in cfg.reward_url or []:
            sources.append((url, HTTPReward(url, timeout=cfg.reward_timeout, retries=cfg.reward_retries,
                                            concurrency=cfg.reward_concurrency,
                                            request_size=cfg.reward_request_size)))
        return cls(sources, cfg.reward_weights, has_model)

    @property
    def empty(self) -> bool:
        return not self.has_model and not self.sources

    def compute(self, prompts: List[str], completions: List[str], columns: Dict[str, list],
                model_scores: Optional[List[float]] = None) -> RewardResult:
        n = len(completions)
        results: List[List[Optional[float]]] = []
        if self.has_model:
            if model_scores is None:
                raise ValueError("this RewardSet includes the reward model: pass model_scores")
            results.append([float(s) for s in model_scores])
        for name, source in self.sources:
            raw = source.call(prompts, completions, columns) if hasattr(source, "call") else \
                source(prompts, completions, **columns)
            results.append(check_rewards(name, raw, n, prompts))
        total: List[Optional[float]] = []
        for j in range(n):
            parts = [r[j] for r in results]
            total.append(None if any(p is None for p in parts) else
                         sum(w * p for w, p in zip(self.weights, parts)))
        return RewardResult(total, dict(zip(self.names, results)))

    def close(self) -> None:
        for _, source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()


def _unique(names: List[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def in_process(fn: Callable, name: Optional[str] = None) -> tuple:
    """A (name, fn) source that runs `fn` in this process (trusted code, tests)."""
    return (name or getattr(fn, "__name__", "reward_fn"), fn)
