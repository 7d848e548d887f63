"""The wiring between what the CLI parsed and the trainers: the config of a one-trainer command
(`trainer_config`), and `fastrlhf train`'s steps, each feeding the next (`build_step_configs`,
`check_step_inputs`, `run_steps`), with a bundled task's settings and held-out evaluation
(`fastrlhf.tasks.registry.TASKS`).

Precedence of values: a config class's defaults < a bundled task's profile (only when no model is
named, or the task's own model) < the --config file < the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..config import TrainConfig
from ..data.spec import PIPELINE_SPLIT_RATIOS
from ..errors import ConfigError
from ..options import config_from_dict, merge_dicts
from ..tasks.registry import TASKS
from .registry import TRAINERS

STEP_NAMES = {1: "sft", 2: "rm", 3: "ppo"}
STEP_DIRS = {1: "step1_sft", 2: "step2_rm", 3: "step3_ppo"}


def _fields_of(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


# The vector instructions of PyTorch's CPU kernels and of MKL's GEMMs, pinned for the bundled tasks
# of PINNED_TASKS, on their bundled models. AVX-512 and AVX2 round differently (the SFT losses
# differ in the 5th digit) and RL sampling turns that into different runs: on this project's 2-core VMs,
# the same commit printed RM accuracy 0.99 and held-out reward 0.17 -> 2.77 with AVX-512, 0.96 and
# 0.34 -> 2.15 pinned to AVX2, as a CPU without AVX-512 runs (benchmarks/results/default_task_notes.md);
# the arithmetic task's GRPO differs the same way. Every x86-64 CPU of such machines has AVX2, so,
# pinned, the README's commands print the README's numbers on all of them. Both libraries read these when
# they first compute, not at import, so setting them before a run starts is in time.
REPRODUCIBLE_CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# The bundled tasks whose README numbers were measured pinned (a task joins once they are; all three
# are since the calculator task was remeasured pinned, 2026-12-02).
PINNED_TASKS = ("default", "arithmetic", "calculator")


@contextlib.contextmanager
def cpu_numerics_pinned(active: bool):
    """REPRODUCIBLE_CPU_NUMERICS for the block when `active` (never over the user's own setting; a
    no-op off x86 and for GPU kernels); the environment as it was afterwards."""
    saved = {key: os.environ.get(key) for key in REPRODUCIBLE_CPU_NUMERICS}
    if active:
        for key, value in REPRODUCIBLE_CPU_NUMERICS.items():
            os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- one trainer

def trainer_config(command: str, file_values: Mapping[str, Any], flags: Mapping[str, Any]):
    """The config of `fastrlhf <command>`: the default task's profile of its trainer (only when no
    model is named) < the file < the flags; a command that is a preset (`fastrlhf grpo`) sets its
    options under the file and flags, and refuses another --algo."""
    entry = TRAINERS[command]
    values = merge_dicts(file_values, flags)
    if not values.get("model_name_or_path"):
        values = merge_dicts(dict(TASKS["default"].profiles.get(entry.profile or command, {})), values)
    for key, value in entry.preset.items():
        if key == "algo" and values.get(key, value) != value:
            raise ConfigError(f"`fastrlhf {command}` runs --algo {value}, not {values[key]}; "
                              f"use `fastrlhf ppo --algo {values[key]}`")
    return config_from_dict(entry.config, merge_dicts(entry.preset, values))


def run_trainer(command: str, cfg) -> str:
    """Train with `cfg`; the one-line summary of the result."""
    entry = TRAINERS[command]
    return entry.summary(entry.train(cfg))


# ----------------------------------------------------------------------------- fastrlhf train

def build_step_configs(*, steps: Optional[Sequence[int]], rm_init: str, task: str, file_values: Mapping[str, Any],
                       flags: Mapping[str, Any], step_files: Mapping[str, Mapping[str, Any]],
                       step_flags: Mapping[str, Mapping[str, Any]],
                       config_file: Optional[str] = None) -> Dict[int, Any]:
    """The config of every requested step, wired so each step feeds the next.

    `file_values` / `flags`: the options shared by all steps from the --config file / the command
    line; `step_files` / `step_flags`: {"sft"|"rm"|"ppo": options of that step only}."""
    bundled = TASKS[task]
    task_common, profiles = bundled.shared(), bundled.profiles
    if 2 not in bundled.steps and 2 in (steps or []):
        raise ConfigError(f"the {task} task has no reward-model step: its reward is a function; use --steps 1 3")
    common = merge_dicts(task_common, merge_dicts(file_values, flags))
    unknown = set(common) - _fields_of(TrainConfig)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} at the top level of {config_file}; "
                          f"step-only keys go under sft:, rm: or ppo:")
    root = common.pop("output_dir", "output")
    base_model = common.get("model_name_or_path")
    task_model = bool(task_common) and base_model == task_common.get("model_name_or_path")
    steps = sorted(set(steps or bundled.steps))
    configs: Dict[int, Any] = {}
    for step in steps:
        name = STEP_NAMES[step]
        cls = TRAINERS[name].config
        fields = _fields_of(cls)
        values = {k: v for k, v in common.items() if k in fields}
        values["output_dir"] = os.path.join(root, STEP_DIRS[step])
        if step == 2 and rm_init == "sft":
            values["model_name_or_path"] = configs[1].output_dir if 1 in configs else os.path.join(root, STEP_DIRS[1])
        if step == 3:
            values["model_name_or_path"] = os.path.join(root, STEP_DIRS[1]) if 1 in steps or not base_model \
                or task_model else base_model
            given = merge_dicts(step_files.get(name, {}), step_flags.get(name, {}))
            # the step-2 model is the reward when step 2 runs now, or when no function/server is named
            if 2 in steps or not (given.get("reward_fn") or given.get("reward_url") or 2 not in bundled.steps):
                values["reward_model"] = os.path.join(root, STEP_DIRS[2])
        values = merge_dicts(values, step_files.get(name, {}))
        values = merge_dicts(values, step_flags.get(name, {}))
        profile = dict(profiles.get(name, {})) if task_model or not base_model else {}
        values = merge_dicts(profile, values)
        if "split_ratios" not in (values.get("data") or {}):  # the pipeline splits each dataset across its steps
            values = merge_dicts(values, {"data": {"split_ratios": PIPELINE_SPLIT_RATIOS}})
        try:
            configs[step] = config_from_dict(cls, values)
        except ConfigError as e:
            raise ConfigError(f"step {step} ({name}): {e}") from None
    return configs


def check_step_inputs(configs: Dict[int, Any]) -> None:
    """Every step's inputs, before step 1 starts: what an earlier step of this run will write is
    taken as given; anything else must be there now (e.g. step1_sft/ for `--steps 3`)."""
    produced: List[str] = []
    for step, cfg in configs.items():
        name = STEP_NAMES[step]
        root = os.path.dirname(os.path.normpath(cfg.output_dir))
        for option, path, _ in cfg.model_inputs():  # another step's output: local, never a hub name
            for other, sub in STEP_DIRS.items():
                if (path and os.path.normpath(path) == os.path.join(root, sub) and other not in configs
                        and not os.path.exists(path)):
                    raise ConfigError(f"step {step} ({name}): {option} {path}: no such directory; it is written by "
                                      f"step {other}: run `fastrlhf train --steps {other} ...` first with the same "
                                      f"--output_dir, add {other} to --steps, or pass --{name}.{option[2:]}")
        try:
            cfg.check_inputs(produced=produced, tokenizers=True)
        except ConfigError as e:
            raise ConfigError(f"step {step} ({name}): {e}") from None
        produced.append(cfg.output_dir)


def run_steps(configs: Dict[int, Any], task: str = "default") -> List[str]:
    """Train every step in order; the summary: one line per step (and the task's held-out
    evaluation before -> after RL, when it has one), then the total time."""
    bundled = TASKS[task]
    summary = []
    t_start = time.time()
    before = None
    for step, cfg in configs.items():
        t0 = time.time()
        entry = TRAINERS[STEP_NAMES[step]]
        if step == 3 and bundled.evaluate is not None:
            before = bundled.evaluate(cfg, cfg.model_name_or_path)
        r = entry.train(cfg)
        summary.append(entry.summary(r))
        del r  # free the engines before the next step
        summary[-1] += f" ({time.time() - t0:.0f}s, saved to {cfg.output_dir})"
        _release_memory()
        if step == 3 and bundled.evaluate is not None:
            after = bundled.evaluate(cfg, os.path.join(cfg.output_dir, "actor"))
            summary.append(bundled.summary(before, after))
    summary.append(f"total {time.time() - t_start:.0f}s")
    return summary


def _release_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
