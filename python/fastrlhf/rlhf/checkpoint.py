"""HF-format model export and the one resumable checkpoint format every trainer uses.

Layout of a run's output_dir:
    config.json, model.safetensors, tokenizer*   the final model (HF `save_pretrained`; step 3
                                                  writes actor/, critic/, actor_ema/ instead)
    training_config.yaml                          the config the run used
    checkpoint-<step>/                            every `save_steps` optimizer steps:
        config.json, model.safetensors, ...         the trained model (the actor for step 3) at that
                                                    step, HF format, loadable as it is
        <role>/                                     other trained models (step 3: critic/)
        ds_state/<role>/                            DeepSpeed state of each (weights, optimizer, scheduler)
        rank_state_<r>.pt                           python / numpy / torch RNG and generator state of each rank
        trainer_state.json                          step, data position, counters, eval before training;
                                                    written last
    checkpoint-<step>.partial/                    a save in progress (or killed): never resumed from
A checkpoint is written under its .partial name and renamed when complete (after its HF model
was read back and found whole), so resume never picks up a half-written one. Before resuming,
`find_resume_checkpoint` verifies a checkpoint (trainer_state.json parses, every file it needs is
there and not truncated) and falls back to the newest valid one, naming the damaged ones. An HF
model is written to a staging dir, checked, then moved into place over the previous model's
files: the files an earlier fastrlhf save wrote there (its `fastrlhf_saved_files.json`) and this one
does not write again are removed, never left to be loaded; nothing else in the dir is ever
deleted. All ranks call the save functions
(ZeRO-3 gathering and DeepSpeed saves are collective); only rank 0 writes the HF files.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, SaveError
from ..models.lora import LoRALinear
from ..utils.distributed import all_ranks_true, barrier, get_rank, get_world_size, is_rank0
from ..utils.logging import json_safe, print_rank0
from .ds_engine import TrainedEngine
from .model_files import hf_model_problem, json_problem, move_into_place, torch_file_problem

TRAINER_STATE = "trainer_state.json"
DS_STATE_DIR = "ds_state"
DS_TAG = "state"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
STAGING_DIR = ".model.partial"  # save_hf_model writes here, then moves the files into place
CHECKPOINT_FORMAT = 2  # 1: fastrlhf 0.1 (one engine, ds_state/ without roles)
_PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- state dicts

def lora_scalings(module: nn.Module) -> Dict[str, Tuple[float, int, float]]:
    """{module name: (scaling, r, alpha)} for fastrlhf LoRALinear and PEFT LoRA layers."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            out[name] = (float(m.scaling), int(m.r), float(m.alpha))
        elif hasattr(m, "lora_A") and hasattr(m, "scaling") and isinstance(getattr(m, "scaling"), dict):
            for adapter, scale in m.scaling.items():  # PEFT: one adapter expected
                out[name] = (float(scale), int(m.r[adapter]), float(m.lora_alpha[adapter]))
    return out


def merge_lora_state_dict(sd: Dict[str, torch.Tensor], scalings: Dict[str, Tuple[float, int, float]]
                          ) -> Dict[str, torch.Tensor]:
    """Plain HF keys with every LoRA update folded in (W + scaling * B @ A, computed in fp32)."""
    out: Dict[str, torch.Tensor] = {}
    lora_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        m = re.match(r"(.*)\.(lora_a|lora_b)$", k) or re.match(r"(.*)\.(lora_A|lora_B)\.[^.]+\.weight$", k)
        if m:
            lora_parts.setdefault(m.group(1), {})[m.group(2).lower()] = value
            continue
        if ".lora_" in k:  # PEFT's embedding/magnitude extras are not supported for export
            raise ValueError(f"cannot merge LoRA tensor {key}; save with merge_lora_on_save=False")
        out[k.replace(".base_layer.", ".")] = value
    for name, parts in lora_parts.items():
        peft_name = _PEFT_PREFIX + name
        scale = scalings.get(name, scalings.get(peft_name))
        if scale is None:
            raise ValueError(f"no LoRA scaling known for {name}")
        w = out[name + ".weight"]
        merged = w.float() + scale[0] * (parts["lora_b"].float() @ parts["lora_a"].float())
        out[name + ".weight"] = merged.to(w.dtype)
    return out


def unwrap_peft(module: nn.Module) -> nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def save_hf_model(engine_or_module, out_dir: str, *, tokenizer=None, merge_lora: bool = True,
                  extra_files: Optional[Dict[str, str]] = None) -> None:
    """`save_pretrained` of the (possibly ZeRO-3 partitioned, LoRA-adapted) model, by rank 0.

    merge_lora=True writes a plain HF model; False keeps LoRA apart (a PEFT adapter dir, or
    fastrlhf_lora.* next to the base weights) so `load_causal_lm` restores it. The files are
    written to out_dir/.model.partial, read back (`hf_model_problem`), then moved into out_dir,
    replacing the model files of an earlier save there. A model that does not read back whole
    raises SaveError naming the file; out_dir keeps what it held."""
    from ..models.loading import save_fastrlhf_lora
    from ..models.reward import RewardModel
    if isinstance(engine_or_module, TrainedEngine):
        module, sd = engine_or_module.module, engine_or_module.full_state_dict()
    else:
        module, sd = engine_or_module, (engine_or_module.state_dict() if is_rank0() else None)
    problem = None
    if is_rank0():
        os.makedirs(out_dir, exist_ok=True)
        stage = os.path.join(out_dir, STAGING_DIR)
        shutil.rmtree(stage, ignore_errors=True)  # left by a save that was killed
        os.makedirs(stage)
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        scalings = lora_scalings(module)
        is_peft = hasattr(module, "peft_config")
        if is_peft and not merge_lora:
            module.save_pretrained(stage, state_dict=_peft_adapter_only(sd))
        elif scalings and not merge_lora:
            base = {k: v for k, v in sd.items() if not k.endswith((".lora_a", ".lora_b"))}
            _save_module(module, stage, base)
            meta = {n: {"r": r, "alpha": a} for n, (_, r, a) in scalings.items()}
            prefix = "backbone." if isinstance(module, RewardModel) else ""
            save_fastrlhf_lora({k[len(prefix):]: v for k, v in sd.items()},
                               {n[len(prefix):]: m for n, m in meta.items()}, stage)
        else:
            _save_module(module, stage, merge_lora_state_dict(sd, scalings) if scalings else sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(stage, name), "w") as f:
                f.write(text)
        problem = hf_model_problem(stage)
        if problem is None:
            move_into_place(stage, out_dir)
    if not all_ranks_true(problem is None):
        raise SaveError(f"the model saved to {out_dir} did not read back whole ({problem or 'see rank 0'}); "
                           "nothing was replaced: check the disk (space, quota) and save again")


def _peft_adapter_only(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if "lora_" in k}


def _save_module(module: nn.Module, out_dir: str, sd: Dict[str, torch.Tensor]) -> None:
    from ..models.reward import RewardModel
    if isinstance(module, RewardModel):
        module.save_pretrained(out_dir, state_dict=sd)
    else:
        unwrap_peft(module).save_pretrained(out_dir, state_dict=sd)


# ----------------------------------------------------------------------------- resumable state

def _another_programs_checkpoint(ckpt: str) -> bool:
    """A checkpoint-<N>/ whose trainer_state.json is whole but not fastrlhf's (e.g. the HF Trainer's,
    which has `global_step` and no `step`): never resumed from, never deleted."""
    try:
        with open(os.path.join(ckpt, TRAINER_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False  # a damaged one of ours: find_resume_checkpoint names it
    return not isinstance(state, dict) or ("step" not in state and "format" not in state)


def checkpoint_dirs(output_dir: str) -> List[str]:
    """fastrlhf's complete checkpoints (trainer_state.json present, no .partial suffix), oldest first."""
    found = []
    for d in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, TRAINER_STATE)) and not _another_programs_checkpoint(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def _refuse_legacy(path: str) -> None:
    legacy = glob.glob(os.path.join(path, "checkpoints", "step_*", "COMPLETE")) + \
        glob.glob(os.path.join(path, "COMPLETE"))
    if legacy:
        raise ConfigError(f"{path} holds a step-3 checkpoint in the older format (checkpoints/step_N/), "
                          "which this fastrlhf cannot resume; start fresh with --resume no "
                          "or use another --output_dir")


def read_trainer_state(ckpt: str) -> Dict[str, Any]:
    """trainer_state.json of a checkpoint; a ConfigError naming the file when it cannot be used."""
    path = os.path.join(ckpt, TRAINER_STATE)
    problem = json_problem(path)
    if problem:
        raise ConfigError(f"checkpoint {ckpt} is damaged: {problem}; resume from another checkpoint "
                          "(--resume DIR), or start fresh with --resume no")
    with open(path) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ConfigError(f"checkpoint {ckpt} is damaged: {path} has no step; resume from another checkpoint "
                          "(--resume DIR), or start fresh with --resume no")
    return state


def checkpoint_problem(ckpt: str) -> Optional[str]:
    """Why checkpoint `ckpt` cannot be resumed from (naming the file), or None: trainer_state.json
    parses, the HF model(s), the DeepSpeed state of every role and every rank's state file are
    there and not truncated. Reads directories and file headers, not the tensors."""
    try:
        state = read_trainer_state(ckpt)
    except ConfigError as e:
        return str(e).split(": ", 1)[1].rsplit("; ", 1)[0]
    if state.get("format") != CHECKPOINT_FORMAT:
        return None  # an older format: load_training_checkpoint explains
    roles = state.get("roles") or [None]
    for i, role in enumerate(roles):
        problem = hf_model_problem(ckpt if i == 0 else os.path.join(ckpt, role))
        if problem:
            return problem
    ds_root = os.path.join(ckpt, DS_STATE_DIR)
    for role in (r for r in roles if r is not None):
        files = glob.glob(os.path.join(ds_root, role, DS_TAG, "*.pt"))
        if not files:
            return f"{os.path.join(ds_root, role, DS_TAG)} holds no DeepSpeed state"
        for f in sorted(files):
            problem = torch_file_problem(f)
            if problem:
                return problem
    for rank in range(int(state.get("world_size", 1))):
        f = _rank_file(ckpt, rank)
        problem = torch_file_problem(f) if os.path.isfile(f) else f"{f} is missing"
        if problem:
            return problem
    return None


def find_resume_checkpoint(output_dir: str, resume: str) -> Optional[str]:
    """The checkpoint `resume` ('auto' | 'no' | a dir) points at, or None to start fresh. 'auto'
    takes the newest complete checkpoint that verifies (`checkpoint_problem`), warning about each
    newer damaged one; a damaged dir named explicitly, or a dir whose checkpoints are all damaged,
    is a ConfigError."""
    if resume == "no":
        return None
    if resume == "auto":
        dirs = checkpoint_dirs(output_dir)
        if not dirs:
            _refuse_legacy(output_dir)
            return None
        damaged = []
        for d in reversed(dirs):
            problem = checkpoint_problem(d)
            if problem is None:
                for bad, why in damaged:
                    print_rank0(f"warning: checkpoint {bad} is damaged ({why}); resuming from {d} instead")
                return d
            damaged.append((d, problem))
        others = f" (and {len(damaged) - 1} older damaged checkpoint(s))" if len(damaged) > 1 else ""
        raise ConfigError(f"no usable checkpoint in {output_dir}: {damaged[0][0]} is damaged ({damaged[0][1]}){others}; "
                          "start fresh with --resume no or use another --output_dir")
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        _refuse_legacy(resume)
        raise ConfigError(f"resume={resume}: not a complete fastrlhf checkpoint (no {TRAINER_STATE}); "
                          f"pick a checkpoint-<step> dir under the output_dir")
    problem = checkpoint_problem(resume)
    if problem:
        raise ConfigError(f"checkpoint {resume} is damaged ({problem}); resume from another checkpoint, "
                          "or start fresh with --resume no")
    return resume


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_file(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"rank_state_{rank}.pt")


def save_training_checkpoint(output_dir: str, step: int, engines: Dict[str, TrainedEngine],
                             trainer_state: Dict[str, Any],
                             rank_state: Optional[Dict[str, Any]] = None, *, tokenizer=None,
                             merge_lora: bool = True, save_total_limit: int = 0,
                             save_extra: Optional[Callable[[str], None]] = None) -> str:
    """Write output_dir/checkpoint-<step> atomically; collective (every rank calls it).

    `engines` maps a role to a `ds_engine.TrainedEngine`; the first is saved as the HF model at the
    checkpoint's root, the others under <role>/, and each one's optimizer/scheduler state under
    ds_state/<role>/. `trainer_state` (JSON, the same on every rank) goes to trainer_state.json,
    `rank_state` (anything torch.save takes, with this rank's RNG added) to rank_state_<rank>.pt,
    and `save_extra(dir)` may add files. Everything is written to checkpoint-<step>.partial, which
    rank 0 renames once it is complete: a save killed midway leaves the previous checkpoint the
    newest one resume finds."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + PARTIAL_SUFFIX
    if is_rank0():
        for leftover in (tmp, final + REPLACED_SUFFIX):  # left by a save that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    for i, (role, engine) in enumerate(engines.items()):
        save_hf_model(engine, tmp if i == 0 else os.path.join(tmp, role), tokenizer=tokenizer, merge_lora=merge_lora)
        engine.save_state(os.path.join(tmp, DS_STATE_DIR, role), DS_TAG)
    torch.save({**(rank_state or {}), "rng": rng_state()}, _rank_file(tmp, get_rank()))
    if save_extra is not None:
        save_extra(tmp)
    barrier()
    if is_rank0():
        state = {**trainer_state, "format": CHECKPOINT_FORMAT, "step": step, "world_size": get_world_size(),
                 "roles": list(engines)}
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:  # last: marks the checkpoint complete
            json.dump(json_safe(state), f, indent=1)
        if os.path.isdir(final):  # the same step saved again (a rerun from an earlier checkpoint): the old
            os.replace(final, final + REPLACED_SUFFIX)  # copy goes aside first, never leaving no checkpoint-<step>
        os.replace(tmp, final)
        shutil.rmtree(final + REPLACED_SUFFIX, ignore_errors=True)
        if save_total_limit > 0:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_checkpoint(ckpt: str, engines: Dict[str, TrainedEngine]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Restore each engine (model, optimizer, scheduler) and this rank's RNG from a checkpoint of
    save_training_checkpoint; returns (trainer_state, rank_state)."""
    state = read_trainer_state(ckpt)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{ckpt} was written by an older fastrlhf (checkpoint format "
                          f"{state.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}); start fresh with "
                          "--resume no or use another --output_dir")
    if state["world_size"] != get_world_size():
        raise ConfigError(f"{ckpt} was saved by {state['world_size']} processes and this run has "
                          f"{get_world_size()}; the optimizer partitions and data order depend on it: resume "
                          "with the same number of processes, or start fresh with --resume no")
    missing = sorted(set(engines) - set(os.listdir(os.path.join(ckpt, DS_STATE_DIR))))
    if missing:
        raise ConfigError(f"{ckpt} has no saved state for {missing} (it was saved by another kind of run); "
                          "start fresh with --resume no or use another --output_dir")
    for role, engine in engines.items():
        if not engine.load_state(os.path.join(ckpt, DS_STATE_DIR, role), DS_TAG):
            raise RuntimeError(f"DeepSpeed could not load the {role} state from {ckpt}/{DS_STATE_DIR}/{role}")
    rank_state = torch.load(_rank_file(ckpt, get_rank()), weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return state, rank_state
