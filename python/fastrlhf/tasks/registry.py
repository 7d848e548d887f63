"""The bundled tasks `fastrlhf train --task NAME` runs, one record each: the steps it runs by
default, the settings tuned for it per trainer (its `PROFILES`), the values every step takes
(its model and data; none for the default task, which is what an unnamed model and no data mean)
and, when it has one, the held-out evaluation printed before and after RL."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from . import arithmetic_task, calculator_task, default_task, evaluation


@dataclass(frozen=True)
class BundledTask:
    name: str
    help: str                                      # for `fastrlhf train --help`
    steps: Tuple[int, ...]                         # the steps `--task NAME` runs unless --steps says
    profiles: Mapping[str, Mapping[str, Any]]      # per trainer (sft, rm, ppo): its tuned settings
    shared: Callable[[], Dict[str, Any]] = dict    # values of every step (the task's model and data)
    # the held-out evaluation of the RL step's model (cfg, model_dir) -> numbers, and its summary line
    evaluate: Optional[Callable[[Any, str], Dict[str, float]]] = None
    summary: Optional[Callable[[Dict[str, float], Dict[str, float]], str]] = None


TASKS: Dict[str, BundledTask] = {t.name: t for t in (
    BundledTask("default", "tone, steps 1 2 3", (1, 2, 3), default_task.PROFILES),
    BundledTask("arithmetic", "word problems: SFT then GRPO with the exact-answer reward function, no reward model; "
                "prints held-out pass@1 and pass@k before and after RL", (1, 3), arithmetic_task.PROFILES,
                shared=arithmetic_task.shared_values, evaluate=evaluation.arithmetic_accuracy,
                summary=evaluation.arithmetic_accuracy_line),
    BundledTask("calculator", "the arithmetic word problems with a calculator tool: SFT on tool-use demonstrations, "
                "then multi-turn GRPO with the tool; prints held-out pass@1, pass@k and greedy accuracy before and "
                "after RL beside the arithmetic task's", (1, 3), calculator_task.PROFILES,
                shared=calculator_task.shared_values, evaluate=evaluation.calculator_accuracy,
                summary=evaluation.calculator_accuracy_line),
)}
