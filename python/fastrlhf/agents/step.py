"""What an environment's `step` returns: a `Step`, or a dict with the same keys. Checked in the
environment's worker (`as_step_dict`), so the trainer only ever receives plain values."""
from __future__ import annotations

import math
import numbers
from dataclasses import KW_ONLY, dataclass
from typing import Any, Dict, Optional

STEP_KEYS = ("observation", "reward", "done")


@dataclass
class Step:
    """One environment step: `observation` (text appended as the environment's turn; None = no
    text), `reward` (a finite number, or None for no reward this step) and `done` (keyword-only,
    required: True ends the trajectory)."""
    observation: Optional[str] = None
    reward: Optional[float] = None
    _: KW_ONLY
    done: bool


class MalformedStep(ValueError):
    """A step() result that is not a Step or a dict of the right keys and types."""


def _short(x: Any, limit: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


def as_step_dict(value: Any) -> Dict[str, Any]:
    """{"observation": str | None, "reward": float | None, "done": bool} from a Step or a dict;
    MalformedStep naming what is wrong otherwise."""
    if isinstance(value, Step):
        obs, reward, done = value.observation, value.reward, value.done
    elif isinstance(value, dict):
        unknown = sorted(set(map(str, value)) - set(STEP_KEYS))
        if unknown:
            raise MalformedStep(f"returned a dict with unknown keys {unknown}; a step is "
                                "{'observation': str | None, 'reward': float | None, 'done': bool}")
        if "done" not in value:
            raise MalformedStep("returned a dict without 'done'; every step says whether the trajectory is over: "
                                "{'observation': ..., 'reward': ..., 'done': False}")
        obs, reward, done = value.get("observation"), value.get("reward"), value["done"]
    else:
        raise MalformedStep(f"returned a {type(value).__name__} ({_short(value)}); return "
                            "fastrlhf.agents.Step(observation, reward, done=...) or a dict with those keys")
    if obs is not None and not isinstance(obs, str):
        raise MalformedStep(f"returned a non-string observation ({type(obs).__name__} {_short(obs)}); an "
                            "observation is text (str) or None")
    if reward is not None:
        if isinstance(reward, (bool, str, bytes)) or not isinstance(reward, numbers.Real):
            raise MalformedStep(f"returned a non-number reward ({type(reward).__name__} {_short(reward)}); a "
                                "reward is a float or None")
        reward = float(reward)
        if not math.isfinite(reward):
            raise MalformedStep(f"returned a {reward} reward; rewards must be finite (or None for no reward)")
    if type(done).__name__ not in ("bool", "bool_"):
        raise MalformedStep(f"returned done={_short(done)} ({type(done).__name__}); done must be True or False")
    return {"observation": obs, "reward": reward, "done": bool(done)}
