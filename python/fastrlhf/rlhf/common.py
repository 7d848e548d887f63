"""The spine every trainer runs on (SFT, reward model, DPO, PPO/GRPO/RLOO):

- `setup_run(cfg)`: process group, CPU threads, seeds, DeepSpeed config, output dir, metrics logger.
- `initialize_engine`: `deepspeed.initialize` with AdamW (DeepSpeedCPUAdam when offloading on a
  GPU machine) and a warmup + cosine/linear/constant schedule that DeepSpeed steps and checkpoints.
- `GlobalBatchSampler`: a seeded shuffle cut into global batches, each split into micro-batches
  per rank and accumulation step, with a resumable position. The global batch of step k is the
  same whatever the world size and accumulation, so 1- and 2-process runs see the same data.
- `eval_batches` / `eval_sums`: the eval set sharded over ranks with equal batch counts (ZeRO-3
  forwards are collective), filler batches weighted 0, per-batch sums reduced over ranks.
- `Trainer`: the step loop (progress bar, logging every `log_steps`, eval every `eval_steps`,
  checkpoints every `save_steps` in the one format of `checkpoint.py`, resume, SIGTERM/SIGINT
  = save and exit) and the run driver (eval before, train, eval after, save). It also guards the
  run: the output dir is locked (`run_guard`), a checkpoint is resumed only by the run that made
  it (its fingerprint), and a step whose loss or gradients are NaN/inf is skipped (the optimizer
  is wrapped so such an update is never applied); `max_nonfinite_steps` skipped steps in a row, or
  NaN/inf weights, stop the run (`TrainingDiverged`) without writing the broken model. A trainer
  subclasses it and supplies one optimizer step (`train_step`), `evaluate`, its trained
  engines and whatever extra state it must carry across a resume.
- `SupervisedTrainer` / `run_supervised`: a Trainer for losses over a fixed dataset (SFT, reward
  model, DPO): accumulation over micro-batches from the sampler.
"""
from __future__ import annotations

import abc
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..config import build_ds_config, ds_precision
from ..errors import ConfigError, TrainingDiverged
from ..options import save_config
from ..utils.distributed import (all_ranks_true, all_reduce_sum, barrier, get_rank, get_world_size, init_distributed,
                                 is_rank0)
from ..utils.logging import MetricsLogger, json_safe, print_rank0, progress_bar, quiet_libraries
from . import checkpoint as ckpt_lib
from . import run_guard


@dataclass
class RunContext:
    cfg: Any
    device: torch.device
    rank: int
    world_size: int
    ds_config: Dict[str, Any]
    micro_batch_size: int
    accumulation: int
    global_batch_size: int
    metrics: MetricsLogger
    kind: str = ""  # sft | rm | ppo | dpo (run_guard.trainer_kind)
    lock: Optional[run_guard.OutputDirLock] = None  # rank 0's lock on output_dir
    fingerprint: Optional[Dict[str, Any]] = None  # what defines this run (run_guard.run_fingerprint)
    resume_from: Optional[str] = None  # the checkpoint cfg.resume picked (verified, same fingerprint)
    resume_checked: bool = False


def check_resume(cfg, fingerprint: Dict[str, Any]) -> Optional[str]:
    """The checkpoint cfg.resume picks (verified by checkpoint.find_resume_checkpoint). With 'auto'
    one saved by a different run (another fingerprint) is refused, naming what differs; a dir
    named explicitly is taken with a warning. Runs before anything is loaded."""
    path = ckpt_lib.find_resume_checkpoint(cfg.output_dir, cfg.resume)
    if path is None:
        return None
    state = ckpt_lib.read_trainer_state(path)
    if "fingerprint" not in state:
        print_rank0(f"warning: {path} was saved by an older fastrlhf without a run fingerprint: whether it "
                    "belongs to this run cannot be checked")
    diffs = run_guard.fingerprint_diff(state.get("fingerprint"), fingerprint)
    if diffs and cfg.resume == "auto":
        raise ConfigError(f"{path} was saved by a different run ({'; '.join(diffs)}): to continue it, rerun "
                          "with that run's options; to start over in this dir, pass --resume no (its "
                          "checkpoints are replaced); or use another --output_dir")
    if diffs:
        print_rank0(f"warning: resuming {path} as asked, although it was saved by a different run "
                    f"({'; '.join(diffs)})")
    return path


def _lock_output_dir(cfg, kind: str) -> Optional[run_guard.OutputDirLock]:
    """Rank 0 locks output_dir and checks what it holds; every rank raises if that failed."""
    lock, error = None, None
    if is_rank0():
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
            lock = run_guard.OutputDirLock(cfg.output_dir).acquire(kind)
            run_guard.check_output_kind(cfg.output_dir, kind, getattr(cfg, "overwrite_output_dir", False))
        except ConfigError as e:
            if lock is not None:
                lock.release()
            error = e
        except OSError as e:  # not a dir, not writable, ...
            error = ConfigError(f"cannot write to output_dir {cfg.output_dir} ({e.strerror or e}): "
                                "pick a writable directory with --output_dir")
    if not all_ranks_true(error is None):
        raise error or ConfigError(f"rank 0 could not start a run in {cfg.output_dir} (see its message)")
    if lock is not None and lock.stale_note:
        print_rank0(f"warning: {lock.stale_note}")
    return lock


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup_run(cfg, check_tokenizers: bool = True) -> RunContext:
    """Validate cfg, join the process group, seed, build the DeepSpeed config, create the output dir.
    `check_tokenizers`: the tokenizer will be loaded from cfg's paths (none was passed in)."""
    cfg.validate()
    cfg.check_inputs(tokenizers=check_tokenizers)  # paths, kinds, output dir, precision: before anything is written
    quiet_libraries()
    device = init_distributed()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    world = get_world_size()
    ds_config = build_ds_config(cfg, world)
    seed_everything(cfg.seed)
    kind = run_guard.trainer_kind(cfg)
    lock = _lock_output_dir(cfg, kind)
    try:
        fingerprint = run_guard.run_fingerprint(cfg, kind)
        resume_from = check_resume(cfg, fingerprint)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if is_rank0():
        save_config(cfg, os.path.join(cfg.output_dir, "training_config.yaml"))
    barrier()
    tb_dir = cfg.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard")
    return RunContext(cfg=cfg, device=device, rank=get_rank(), world_size=world, ds_config=ds_config,
                      micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
                      accumulation=ds_config["gradient_accumulation_steps"],
                      global_batch_size=ds_config["train_batch_size"], metrics=MetricsLogger(tb_dir),
                      kind=kind, lock=lock, fingerprint=fingerprint, resume_from=resume_from, resume_checked=True)


def training_dtype(ctx: RunContext) -> str:
    return ds_precision(ctx.ds_config)


# ----------------------------------------------------------------------------- optimizer / schedule

def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (all frozen?)")
    return groups


def all_finite(tensors) -> bool:
    """True when no tensor holds a NaN/inf (one host sync per device)."""
    by_device: Dict[Any, List[torch.Tensor]] = {}
    for t in tensors:
        if t is not None and t.numel():
            by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def guard_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer.step()` refuse an update whose gradients hold NaN/inf (or that the trainer
    marked with `fastrlhf_skip_next`), counting it in `fastrlhf_skipped`, and flag weights that
    come out of a step non-finite (`fastrlhf_bad_weights`). DeepSpeed calls this step on the
    (fp32 master) parameters under every ZeRO stage; `overflow` tells DeepSpeed without ZeRO to
    treat a refused step as it treats an fp16 overflow (the schedule holds). The instance's step is
    wrapped (DeepSpeed checks the optimizer's exact type), after the LR scheduler's own wrapper."""
    inner = optimizer.step

    def step(*args, **kwargs):
        optimizer._opt_called = True  # what the LR scheduler's wrapper records
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if optimizer.fastrlhf_skip_next or not all_finite([p.grad for p in params]):
            optimizer.fastrlhf_skip_next = False
            optimizer.fastrlhf_skipped += 1
            optimizer.overflow = True
            return None
        optimizer.overflow = False
        out = inner(*args, **kwargs)
        if not all_finite(params):
            optimizer.fastrlhf_bad_weights = True
        return out

    step._wrapped_by_lr_sched = True
    optimizer.step = step
    optimizer.fastrlhf_skip_next, optimizer.fastrlhf_skipped, optimizer.fastrlhf_bad_weights = False, 0, False
    optimizer.overflow = False
    return optimizer


def optimizer_step(engine, skip: bool = False) -> Optional[bool]:
    """`engine.step()`. Off an accumulation boundary: None. On one: whether the update was applied
    (False: NaN/inf gradients, or `skip` — e.g. the trainer saw a NaN/inf loss; the weights are
    unchanged). An fp16 loss-scale overflow is DeepSpeed's business and counts as applied."""
    opt = getattr(engine, "fastrlhf_optimizer", None)
    boundary = engine.is_gradient_accumulation_boundary()
    before = opt.fastrlhf_skipped if opt is not None else 0
    if opt is not None and boundary:
        opt.fastrlhf_skip_next = skip
    engine.step()
    if opt is not None:
        opt.fastrlhf_skip_next = False
    if not boundary:
        return None
    refused = opt is not None and opt.fastrlhf_skipped > before
    return not (refused or skip or (not engine.fp16_enabled() and not engine.was_step_applied()))


def weights_finite(engine) -> bool:
    """Collective: no rank's (partition of the) weights holds NaN/inf."""
    module = getattr(engine, "module", engine)
    return all_ranks_true(all_finite([getattr(p, "ds_tensor", p) for p in module.parameters()]))


def make_optimizer(model: nn.Module, cfg, ds_config: Dict[str, Any], lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = tuple(cfg.adam_betas)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    # with GPUs, offloaded optimizer states want DeepSpeed's vectorised CPU Adam; on a CPU-only
    # machine everything is on the CPU already and JIT-building that op only costs minutes
    if offload and torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
        except Exception as e:  # building the op needs a compiler; torch AdamW still works
            print_rank0(f"DeepSpeedCPUAdam unavailable ({type(e).__name__}: {e}); using torch AdamW")
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_steps_for(cfg, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine / linear decay to 0, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def initialize_engine(model: nn.Module, cfg, ds_config: Dict[str, Any], total_steps: int, *,
                      lr: Optional[float] = None, warmup: Optional[int] = None):
    """`deepspeed.initialize` with our optimizer and schedule over `total_steps` optimizer steps.
    `lr` and `warmup` default to cfg.learning_rate and cfg.warmup_steps / warmup_ratio."""
    import deepspeed
    optimizer = make_optimizer(model, cfg, ds_config, cfg.learning_rate if lr is None else lr)
    warmup = warmup_steps_for(cfg, total_steps) if warmup is None else warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup, total_steps, cfg.lr_scheduler))
    guard_optimizer(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    engine.fastrlhf_optimizer = optimizer  # the guarded one (optimizer_step, Trainer's weight check)
    return engine


def frozen_engine(module: nn.Module, ds_config: Dict[str, Any], device: torch.device):
    """A model that is only run forward: a ZeRO-3 inference engine when ds_config asks for stage 3
    (its weights partitioned like the trained ones), else the module on the device."""
    module.requires_grad_(False)
    module.eval()
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed
        ds = {k: v for k, v in ds_config.items() if k != "gradient_clipping"}
        engine, *_ = deepspeed.initialize(model=module, config=ds)
        engine.eval()
        return engine
    return module.to(device)


# ----------------------------------------------------------------------------- data order

class GlobalBatchSampler:
    """Micro-batches of indices for one rank: permutation(seed, epoch) -> global batches (last
    partial one dropped) -> each split into accumulation x world micro-batches, micro-batch
    (a * world + rank) going to this rank at accumulation step a. `next_step()` walks the epochs;
    its position (`state_dict`) is all a resume needs."""

    def __init__(self, num_items: int, micro: int, accumulation: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, what: str = "the training set", fix: str = "lower "
                 "--global_batch_size/--micro_batch_size or add data"):
        self.num_items, self.micro, self.accum, self.world, self.rank = num_items, micro, accumulation, world, rank
        self.global_batch = micro * accumulation * world
        self.seed, self.shuffle = seed, shuffle
        if num_items < self.global_batch:
            raise ConfigError(f"{what} has {num_items} examples, fewer than one global batch "
                             f"({self.global_batch}); {fix}")
        self.epoch, self.micro_in_epoch = 0, 0
        self._order: Tuple[int, List[int]] = (-1, [])

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + 100_003 * epoch)
            self._order = (epoch, torch.randperm(self.num_items, generator=g).tolist())
        return self._order[1]

    def next_step(self) -> List[List[int]]:
        """This rank's `accumulation` micro-batches of the next optimizer step."""
        if self.micro_in_epoch >= self.micro_batches_per_epoch:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        out = []
        for i in range(self.micro_in_epoch, self.micro_in_epoch + self.accum):
            step, a = divmod(i, self.accum)
            chunk = step * self.global_batch + (a * self.world + self.rank) * self.micro
            out.append(order[chunk:chunk + self.micro])
        self.micro_in_epoch += self.accum
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.micro_in_epoch = state["epoch"], state["micro_in_epoch"]


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def eval_batches(dataset, collate: Callable, batch_size: int, rank: int, world: int,
                 max_batches: Optional[int] = None):
    """Yield (batch, weight) with the same number of batches on every rank; weight 0 marks filler."""
    n = len(dataset)
    if n == 0:
        return
    mine = list(range(rank, n, world))
    per_rank = math.ceil(math.ceil(n / world) / batch_size)
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for b in range(per_rank):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        if idx:
            yield collate([dataset[i] for i in idx]), 1.0
        else:  # this rank ran out: a throwaway batch keeps the collective forwards in step
            yield collate([dataset[0]]), 0.0


@torch.no_grad()
def eval_sums(model, dataset, collate: Callable, batch_size: int, ctx: RunContext, max_batches: Optional[int],
              batch_sums: Callable[[Dict[str, Any]], List[float]], size: int) -> List[float]:
    """Sum of `batch_sums(batch)` (`size` numbers per batch, on the device) over the eval set of
    every rank, with `model` in eval mode meanwhile. Each trainer turns the sums into its metrics."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(size, dtype=torch.float64)
    for batch, weight in eval_batches(dataset, collate, batch_size, ctx.rank, ctx.world_size, max_batches):
        sums += weight * torch.tensor(batch_sums(to_device(batch, ctx.device)), dtype=torch.float64)
    if was_training:
        model.train()
    return all_reduce_sum(sums).tolist()


def total_train_steps(cfg, steps_per_epoch: int) -> int:
    total = cfg.num_epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def describe_run(ctx: RunContext, model: nn.Module, n_train: int, n_eval: int, total_steps: int,
                 unit: str = "examples") -> None:
    def numel(p):  # ZeRO-3 leaves an empty placeholder; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())
    n_params = sum(numel(p) for p in model.parameters())
    n_train_params = sum(numel(p) for p in model.parameters() if p.requires_grad)
    print_rank0(f"{n_params / 1e6:.2f}M parameters ({n_train_params / 1e6:.2f}M trainable), "
                f"{n_train} train / {n_eval} eval {unit}, {total_steps} steps of {ctx.global_batch_size} "
                f"(micro {ctx.micro_batch_size} x accumulation {ctx.accumulation} x {ctx.world_size} processes), "
                f"ZeRO-{ctx.ds_config.get('zero_optimization', {}).get('stage', 0)}, {training_dtype(ctx)}")


# ----------------------------------------------------------------------------- the spine

class Trainer(abc.ABC):
    """Subclasses set `self.total_steps` and implement `train_step` (one optimizer step; returns
    its metrics), `evaluate`, `trained_engines` ({role: DeepSpeed engine}, the first being the
    model a checkpoint holds in HF format at its root) and, when they carry state across a resume,
    `state_dict`/`load_state_dict` (JSON, the same on every rank), `rank_state_dict`/
    `load_rank_state_dict` (this rank's, e.g. generators) and `save_extra`/`load_extra` (files).
    `train_step` reports what was NaN/inf in its step through `count_nonfinite`; `has_eval_data`
    says whether there is anything to evaluate on."""

    label = "train"
    step_noun = "steps"  # in messages: "3 consecutive steps had ..."
    diverged_error = TrainingDiverged

    def __init__(self, cfg, ctx: RunContext, tokenizer):
        self.cfg, self.ctx, self.tokenizer = cfg, ctx, tokenizer
        self.step = 0
        self.total_steps = 0
        self.history: List[Dict[str, float]] = []
        self.eval_before: Optional[Dict[str, float]] = None
        self.resumed_from: Optional[str] = None
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.last_checkpoint: Optional[str] = None
        self._stop_signal: Optional[int] = None
        self._old_handlers: Optional[Dict[int, Any]] = None
        self._fingerprint: Optional[Dict[str, Any]] = None
        self._replaced_checkpoints: List[str] = []  # a fresh run's predecessors, removed at its first save
        self._saved = False

    # ------------------------------------------------------------------ what a trainer provides
    @abc.abstractmethod
    def train_step(self) -> Dict[str, float]:
        ...

    @abc.abstractmethod
    def evaluate(self) -> Dict[str, float]:
        ...

    @abc.abstractmethod
    def trained_engines(self) -> Dict[str, Any]:
        ...

    def has_eval_data(self) -> bool:
        return True

    def format_metrics(self, metrics: Dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def format_eval(self, before: Dict[str, float], after: Dict[str, float]) -> str:
        """Printed after training (the eval before was printed when the run started)."""
        return f"[{self.label}] eval after training:  {self.format_metrics(after)}"

    def postfix(self, metrics: Dict[str, float]) -> Dict[str, str]:
        """What the progress bar shows after each step."""
        return {k: f"{v:.4g}" for k, v in metrics.items() if k == "loss"}

    def divergence_hint(self) -> str:
        lr = self.cfg.learning_rate
        fp16 = ", or train in bf16/fp32 rather than fp16" if getattr(self.cfg, "dtype", "") == "fp16" else ""
        return f"lower --learning_rate (now {lr:g}){fp16}"

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def rank_state_dict(self) -> Dict[str, Any]:
        return {}

    def load_rank_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def save_extra(self, ckpt_dir: str) -> None:
        pass

    def load_extra(self, ckpt_dir: str) -> None:
        pass

    def save_final(self) -> Dict[str, str]:
        """The trained model(s) in HF format: the first engine at output_dir, others under <role>/."""
        paths = {}
        for i, (role, engine) in enumerate(self.trained_engines().items()):
            paths[role] = self.cfg.output_dir if i == 0 else os.path.join(self.cfg.output_dir, role)
            ckpt_lib.save_hf_model(engine, paths[role], tokenizer=self.tokenizer,
                                   merge_lora=self.cfg.merge_lora_on_save)
        return paths

    # ------------------------------------------------------------------ run identity, non-finite guard
    def fingerprint(self) -> Dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = self.ctx.fingerprint or run_guard.run_fingerprint(
                self.cfg, self.ctx.kind or run_guard.trainer_kind(self.cfg))
        return self._fingerprint

    def _checkpoint_note(self) -> str:
        if self.last_checkpoint:
            return (f"the last good checkpoint is {self.last_checkpoint} (restart from it with --resume "
                    f"{self.last_checkpoint} and the lower value)")
        why = " (--save_steps 0)" if not self.cfg.save_steps else " yet"
        return f"no checkpoint was saved{why}, and no model was written"

    def count_nonfinite(self, what: Optional[str]) -> None:
        """Called by `train_step` with what was NaN/inf in the step it just made (its update was
        skipped), or None. `max_nonfinite_steps` such steps in a row stop the run."""
        if what is None:
            self.nonfinite_streak = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        step, limit = self.step + 1, self.cfg.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise self.diverged_error(
                f"{self.nonfinite_streak} consecutive {self.step_noun} had NaN/inf {what} (the last at step {step}) "
                f"and were skipped; the run is diverging: {self.divergence_hint()}; {self._checkpoint_note()}")
        print_rank0(f"[{self.label}] step {step}: NaN/inf {what}, the update was skipped "
                    f"({self.nonfinite_streak} in a row; the run stops at {limit})")

    def _check_weights(self, when: str) -> None:
        """Stop if a step left NaN/inf weights (the optimizer flags it), or before saving them."""
        for role, engine in self.trained_engines().items():
            opt = getattr(engine, "fastrlhf_optimizer", None)
            flagged = opt is not None and opt.fastrlhf_bad_weights
            if not all_ranks_true(not flagged) or (when != "step" and not weights_finite(engine)):
                what = f"the {role} weights became NaN/inf at step {self.step} (the update was too large)"
                if when != "step":
                    what = f"the {role} weights hold NaN/inf at step {self.step}; {when} was not written"
                raise self.diverged_error(f"{what}: {self.divergence_hint()}; {self._checkpoint_note()}")

    def _record(self, status: str, **extra: Any) -> None:
        """fastrlhf_run.json: the kind of run that writes this dir and how it stands (rank 0)."""
        if is_rank0() and (self._saved or run_guard.read_run_file(self.cfg.output_dir).get("trainer") == self.ctx.kind):
            run_guard.write_run_file(self.cfg.output_dir, self.ctx.kind, status, step=self.step,
                                     total_steps=self.total_steps, last_checkpoint=self.last_checkpoint,
                                     fingerprint=self.fingerprint(), **extra)

    def _after_save(self, path: str) -> None:
        self._saved = True
        if is_rank0():
            for old in self._replaced_checkpoints:
                if os.path.abspath(old) != os.path.abspath(path):
                    shutil.rmtree(old, ignore_errors=True)
        self._replaced_checkpoints = []

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        self._check_weights(f"checkpoint-{self.step}")
        state = {"eval_before": self.eval_before, "trainer": self.state_dict(), "fingerprint": self.fingerprint(),
                 "nonfinite": [self.nonfinite_total, self.nonfinite_streak]}
        path = ckpt_lib.save_training_checkpoint(
            self.cfg.output_dir, self.step, self.trained_engines(), state, self.rank_state_dict(),
            tokenizer=self.tokenizer, merge_lora=self.cfg.merge_lora_on_save,
            save_total_limit=self.cfg.save_total_limit, save_extra=self.save_extra)
        self.last_checkpoint = path
        self._after_save(path)
        self._record("running")
        return path

    def maybe_resume(self) -> Optional[str]:
        """Continue from the checkpoint cfg.resume names (newest valid one in output_dir for 'auto'),
        if it was saved by this run (same fingerprint) and is not past this run's last step."""
        cfg = self.cfg
        if self.ctx.resume_checked:  # setup_run looked before anything was loaded
            path, self.ctx.resume_checked = self.ctx.resume_from, False
        else:
            path = check_resume(cfg, self.fingerprint())
        if path is None:
            self._replaced_checkpoints = ckpt_lib.checkpoint_dirs(cfg.output_dir)
            if self._replaced_checkpoints:
                print_rank0(f"[{self.label}] starting fresh (--resume {cfg.resume}): the {len(self._replaced_checkpoints)} "
                            f"earlier checkpoint(s) in {cfg.output_dir} are deleted when this run saves")
            return None
        state = ckpt_lib.read_trainer_state(path)
        if state["step"] > self.total_steps:
            raise ConfigError(f"{path} is at step {state['step']}, past the {self.total_steps} steps of this run "
                              f"(max_steps / num_epochs): raise --max_steps to continue it, or start over with "
                              f"--resume no or another --output_dir")
        state, rank_state = ckpt_lib.load_training_checkpoint(path, self.trained_engines())
        self.step, self.eval_before = state["step"], state["eval_before"]
        self.nonfinite_total, self.nonfinite_streak = state.get("nonfinite", [0, 0])
        self.load_state_dict(state["trainer"])
        self.load_rank_state_dict(rank_state)
        self.load_extra(path)
        self.resumed_from = self.last_checkpoint = path
        print_rank0(f"[{self.label}] resumed from {path} at step {self.step}")
        if self.step == self.total_steps:
            print_rank0(f"[{self.label}] {path} already holds all {self.total_steps} steps of this run: nothing is "
                        "left to train; it is evaluated and saved as the final model")
        return path

    # ------------------------------------------------------------------ the loop
    def train(self) -> List[Dict[str, float]]:
        cfg = self.cfg
        if not self.ctx.metrics.begun:  # train() called on its own, without run()
            self.ctx.metrics.begin(self.step if self.resumed_from else None)
        bar = progress_bar(self.total_steps, self.label, initial=min(self.step, self.total_steps))
        installed = self._install_signal_handlers()
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.step += 1
                self._check_weights("step")
                self.history.append({"step": self.step, **metrics})
                bar.update(1)
                bar.set_postfix(self.postfix(metrics))
                if self.step % max(1, cfg.log_steps) == 0 or self.step == self.total_steps:
                    self.ctx.metrics.log({f"train/{k}": v for k, v in metrics.items()}, self.step)
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step != self.total_steps \
                        and self.has_eval_data():
                    self.ctx.metrics.log({f"eval/{k}": v for k, v in self.evaluate().items()}, self.step)
                if not all_ranks_true(self._stop_signal is None):  # every rank saves, or none
                    signum = self._stop_signal or signal.SIGTERM
                    path = self.save_checkpoint()
                    self._record("stopped", signal=int(signum))
                    print_rank0(f"signal {signum}: checkpoint saved to {path} at step {self.step}; "
                                "exiting (rerun the same command to continue)")
                    raise SystemExit(128 + signum)
                if cfg.save_steps and (self.step % cfg.save_steps == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        finally:
            bar.close()
            if installed:
                self._restore_signal_handlers()
        return self.history

    def _install_signal_handlers(self) -> bool:
        """SIGTERM (a scheduler's preemption) and SIGINT: finish the step, save, exit. A second
        signal stops at once, without saving. False when not installed (already, or not the main thread)."""
        if self._old_handlers is not None or threading.current_thread() is not threading.main_thread():
            return False

        def handler(signum, _frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
            self._stop_signal = signum  # no printing here: a handler may interrupt a write to the same stream

        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return True

    def _restore_signal_handlers(self) -> None:
        for s, h in (self._old_handlers or {}).items():
            signal.signal(s, h)
        self._old_handlers = None

    def run(self) -> Dict[str, Any]:
        """Resume if asked, evaluate, train, evaluate again, save the final model(s). The signal
        handlers cover the whole run: a signal before training exits without saving (nothing was
        trained), one after the last step lets the final save finish. The output dir's lock is
        released however the run ends."""
        installed = self._install_signal_handlers()
        try:
            return self._run()
        except TrainingDiverged as e:
            self._record("diverged", message=str(e))
            raise
        finally:
            if installed:
                self._restore_signal_handlers()
            self.ctx.metrics.close()
            if self.ctx.lock is not None:
                self.ctx.lock.release()

    def _exit_if_signalled(self, where: str) -> None:
        if all_ranks_true(self._stop_signal is None):
            return
        signum = self._stop_signal or signal.SIGTERM
        kept = f"; {self.resumed_from} is still the newest checkpoint" if self.resumed_from else ""
        print_rank0(f"signal {signum} {where}: nothing was trained, nothing saved{kept}; exiting")
        raise SystemExit(128 + signum)

    def _run(self) -> Dict[str, Any]:
        self.maybe_resume()
        self.ctx.metrics.begin(self.step if self.resumed_from else None)
        has_eval = self.has_eval_data()
        if not has_eval:
            self.eval_before = {}
            print_rank0(f"[{self.label}] no eval data (the eval split is empty, e.g. data.eval_fraction 0): the "
                        "evaluations before and after training are skipped")
        elif self.eval_before is None:
            self.eval_before = self.evaluate()
            self.ctx.metrics.log({f"eval/{k}": v for k, v in self.eval_before.items()}, self.step)
            when = f" (of the model resumed from {self.resumed_from})" if self.resumed_from else ""
            print_rank0(f"[{self.label}] eval before training{when}: {self.format_metrics(self.eval_before)}")
        else:
            when = f" (at the start of the run resumed from {self.resumed_from})" if self.resumed_from else ""
            print_rank0(f"[{self.label}] eval before training{when}: {self.format_metrics(self.eval_before)}")
        self._exit_if_signalled("before training")
        self.train()
        after: Dict[str, float] = {}
        if has_eval:
            after = self.evaluate()
            self.ctx.metrics.log({f"eval/{k}": v for k, v in after.items()}, self.step)
            print_rank0(self.format_eval(self.eval_before, after))
        self._check_weights("the final model")
        paths = self.save_final()
        self._after_save(self.cfg.output_dir)
        if is_rank0():
            with open(os.path.join(self.cfg.output_dir, "eval_before_after.json"), "w") as f:
                json.dump(json_safe({"before": self.eval_before, "after": after}), f, indent=1)
        self._record("finished")
        print_rank0(f"[{self.label}] saved to {self.cfg.output_dir}")
        if self._stop_signal is not None:
            print_rank0(f"signal {self._stop_signal} arrived after the last step: the run was finished and saved")
        return {"eval_before": self.eval_before, "eval_after": after, "history": self.history,
                "steps": self.step, "output_dir": self.cfg.output_dir, "paths": paths, "trainer": self}


# ----------------------------------------------------------------------------- fixed-dataset trainers

LossFn = Callable[[Any, Dict[str, Any]], torch.Tensor]


class SupervisedTrainer(Trainer):
    """A loss over a fixed dataset (SFT, reward model, DPO): each optimizer step accumulates
    the rank's micro-batches of one global batch; the data position is the resumable state.

    `loss_fn(engine, batch)` is the micro-batch loss (the engine scales it for accumulation);
    `evaluate_fn(trainer)` returns the eval metrics; `fmt(metrics)` renders them on one line."""

    def __init__(self, cfg, ctx: RunContext, *, engine, tokenizer, sampler: GlobalBatchSampler, train_dataset,
                 eval_dataset, collate, loss_fn: LossFn, evaluate_fn: Callable[["SupervisedTrainer"], Dict[str, float]],
                 fmt: Callable[[Dict[str, float]], str], label: str):
        super().__init__(cfg, ctx, tokenizer)
        self.engine, self.sampler, self.collate = engine, sampler, collate
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.loss_fn, self.evaluate_fn, self.fmt, self.label = loss_fn, evaluate_fn, fmt, label
        self.total_steps = total_train_steps(cfg, self.sampler.steps_per_epoch)
        self.eval_batch_size = cfg.eval_batch_size or ctx.micro_batch_size
        self.engine.train()

    @property
    def losses(self) -> Dict[int, float]:
        return {h["step"]: h["loss"] for h in self.history}

    def train_step(self) -> Dict[str, float]:
        t0 = time.perf_counter()
        total, bad_loss, applied = 0.0, False, True
        micro_batches = self.sampler.next_step()
        for n, idx in enumerate(micro_batches):
            batch = to_device(self.collate([self.train_dataset[i] for i in idx]), self.engine.device)
            loss = self.loss_fn(self.engine, batch)
            value = loss.detach().float().item()
            bad_loss = bad_loss or not math.isfinite(value)
            self.engine.backward(loss)
            if n == len(micro_batches) - 1:  # the step is skipped on every rank, or on none
                bad_loss = not all_ranks_true(not bad_loss)
            applied = optimizer_step(self.engine, skip=bad_loss) is not False and applied
            total += value
        self.count_nonfinite("loss" if bad_loss else None if applied else "gradients")
        summed = all_reduce_sum(torch.tensor([total, len(micro_batches)], dtype=torch.float64))
        return {"loss": float(summed[0] / summed[1]), "lr": self.engine.get_lr()[0],
                "samples_per_s": self.ctx.global_batch_size / max(1e-9, time.perf_counter() - t0),
                "nonfinite_steps": float(self.nonfinite_total)}

    def has_eval_data(self) -> bool:
        return len(self.eval_dataset) > 0

    def evaluate(self) -> Dict[str, float]:
        return self.evaluate_fn(self)

    def format_metrics(self, metrics: Dict[str, float]) -> str:
        return self.fmt(metrics)

    def eval_sums(self, batch_sums: Callable[[Dict[str, Any]], List[float]], size: int) -> List[float]:
        return eval_sums(self.engine, self.eval_dataset, self.collate, self.eval_batch_size, self.ctx,
                         self.cfg.eval_max_batches, batch_sums, size)

    def trained_engines(self) -> Dict[str, Any]:
        return {"model": self.engine}

    def state_dict(self) -> Dict[str, Any]:
        return {"data": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["data"])


def run_supervised(cfg, *, step: int, label: str, load_model: Callable, default_collate: Callable,
                   loss_fn: LossFn, evaluate_fn: Callable, fmt: Callable[[Dict[str, float]], str],
                   prepare_model: Optional[Callable[[nn.Module, RunContext, Any], None]] = None,
                   model=None, tokenizer=None, datasets=None, collate=None) -> Dict[str, Any]:
    """The driver of the fixed-dataset trainers: load what was not passed in, build the engine,
    then `SupervisedTrainer.run()`. `step` picks the data split (1: SFT items, 2: preference pairs);
    `load_model(path, tokenizer=, dtype=, seed=, ds_config=)` builds the model and
    `prepare_model(model, ctx, tokenizer)` may adjust it (or load companions such as DPO's frozen
    reference) before the engine is built."""
    from ..models.loading import apply_lora_from_config, enable_gradient_checkpointing, load_tokenizer

    ctx = setup_run(cfg, check_tokenizers=tokenizer is None)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model_name_or_path)
    if datasets is None:
        from ..data import build_datasets
        datasets = build_datasets(cfg.data, tokenizer, step)
    train_ds, eval_ds = datasets
    if collate is None:
        collate = default_collate(tokenizer.pad_token_id)
    if model is None:
        model = load_model(cfg.model_name_or_path, tokenizer=tokenizer, dtype=training_dtype(ctx),
                           seed=cfg.seed, ds_config=ctx.ds_config)
    apply_lora_from_config(model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if prepare_model is not None:
        prepare_model(model, ctx, tokenizer)
    sampler = GlobalBatchSampler(len(train_ds), ctx.micro_batch_size, ctx.accumulation, ctx.world_size, ctx.rank,
                                 cfg.seed)
    engine = initialize_engine(model, cfg, ctx.ds_config, total_train_steps(cfg, sampler.steps_per_epoch))
    trainer = SupervisedTrainer(cfg, ctx, engine=engine, tokenizer=tokenizer, sampler=sampler, train_dataset=train_ds,
                                eval_dataset=eval_ds, collate=collate, loss_fn=loss_fn, evaluate_fn=evaluate_fn,
                                fmt=fmt, label=label)
    describe_run(ctx, engine.module, len(train_ds), len(eval_ds), trainer.total_steps)
    result = trainer.run()
    result.update(losses=trainer.losses, engine=engine)
    return result
