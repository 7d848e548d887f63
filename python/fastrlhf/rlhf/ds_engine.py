"""The one module that touches DeepSpeed (everything else in rlhf/ goes through it):

- the DeepSpeed config built from a trainer's options (`build_ds_config`, `batch_geometry`,
  `ds_precision`), or the user's own JSON with its "auto" values filled in;
- the optimizer (AdamW, DeepSpeedCPUAdam when offloading on a GPU machine) and the warmup +
  cosine/linear/constant schedule DeepSpeed steps and checkpoints;
- the non-finite guard (`StepGuard`): the optimizer's step refuses an update whose gradients hold
  NaN/inf (or that the trainer marked), and flags weights that come out of a step non-finite;
- `initialize_engine` -> `TrainedEngine`, the small typed wrapper every trainer holds for a model
  it trains (forward, backward, the guarded step, its DeepSpeed state, the full state dict
  gathered from ZeRO-3 partitions), and `frozen_engine` for models only run forward;
- ZeRO-3 parameters: gathering them (`gathered_parameters`, e.g. for the actor's EMA), their
  full size and local shard.

HF's side of ZeRO-3 loading (weights partitioned as `from_pretrained` reads them) stays in
`models/loading.py`: it is transformers' integration, driven by the ds_config built here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..config import read_deepspeed_config
from ..errors import ConfigError
from ..utils.distributed import all_ranks_true, is_rank0
from ..utils.logging import print_rank0

# ----------------------------------------------------------------------------- the DeepSpeed config

def batch_geometry(global_batch_size: Optional[int], micro_batch_size: int, world_size: int) -> Dict[str, int]:
    """(global, micro, accumulation) with global = micro * accumulation * world, or ConfigError."""
    if micro_batch_size < 1 or world_size < 1:
        raise ConfigError(f"micro_batch_size ({micro_batch_size}) and world size ({world_size}) must be >= 1")
    per_step = micro_batch_size * world_size
    total = global_batch_size or per_step
    if total % per_step != 0:
        lo, hi = (total // per_step) * per_step, (total // per_step + 1) * per_step
        raise ConfigError(
            f"global_batch_size={total} is not a multiple of micro_batch_size ({micro_batch_size}) x world size "
            f"({world_size}) = {per_step}; use e.g. --global_batch_size {hi}" + (f" or {lo}" if lo else "")
            + " or change --micro_batch_size")
    return {"train_batch_size": total, "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": total // per_step}


def build_ds_config(cfg: Any, world_size: int) -> Dict[str, Any]:
    """DeepSpeed config dict from a config with TrainConfig's fields (works for PPOConfig too).

    With `cfg.deepspeed_config` set, that JSON is used instead; its "auto" values (batch sizes,
    accumulation, clipping, precision) are filled in from `cfg`."""
    geometry = batch_geometry(cfg.global_batch_size, cfg.micro_batch_size, world_size)
    if getattr(cfg, "deepspeed_config", None):
        return _fill_auto(read_deepspeed_config(cfg.deepspeed_config), cfg, geometry, world_size)
    zero: Dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7,
                    stage3_gather_16bit_weights_on_model_save=True)
    if cfg.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds = dict(geometry)
    ds.update({
        "zero_optimization": zero,
        "gradient_clipping": float(cfg.gradient_clipping),
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10 ** 9,  # fastrlhf logs itself
        "wall_clock_breakdown": False,
        # a client optimizer (torch AdamW) is allowed with offload; DeepSpeedCPUAdam is preferred
        "zero_force_ds_cpu_optimizer": False,
    })
    return ds


def _fill_auto(user: Dict[str, Any], cfg: Any, geometry: Dict[str, int], world_size: int) -> Dict[str, Any]:
    ds = json.loads(json.dumps(user))
    for key, value in geometry.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(cfg.gradient_clipping)
    for prec in ("bf16", "fp16"):
        if isinstance(ds.get(prec), dict) and ds[prec].get("enabled") == "auto":
            ds[prec]["enabled"] = cfg.dtype == prec
    mb, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if ds["train_batch_size"] != mb * accum * world_size:
        raise ConfigError(f"{cfg.deepspeed_config}: train_batch_size ({ds['train_batch_size']}) != "
                          f"micro ({mb}) x accumulation ({accum}) x world size ({world_size})")
    return ds


def ds_precision(ds_config: Mapping[str, Any]) -> str:
    """The training dtype a DeepSpeed config asks for: 'bf16', 'fp16' or 'fp32'."""
    for prec in ("bf16", "fp16"):
        if isinstance(ds_config.get(prec), Mapping) and ds_config[prec].get("enabled") is True:
            return prec
    return "fp32"


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def ds_config_for(cfg: Any, run_ds_config: Dict[str, Any], world_size: int, stage: int, offload: str) -> Dict[str, Any]:
    """The DeepSpeed config of another model of the run (step 3's critic, frozen models) with its own
    ZeRO stage and offload; the user's JSON, when given, serves every trained model."""
    if cfg.deepspeed_config:
        return run_ds_config
    return build_ds_config(dataclasses.replace(cfg, zero_stage=stage, offload=offload), world_size)


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
    # the fused kernel (one pass over all parameters; on the CPU too since torch 2.4) instead of
    # the per-tensor loop: several times faster per step for small models, same update rule
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


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


# ----------------------------------------------------------------------------- the non-finite guard

def all_finite(tensors) -> bool:
    """True when no tensor holds a NaN/inf (one host sync per device and dtype): the max-norm of
    each tensor (one foreach call per group) is finite exactly when all its elements are."""
    groups: Dict[Any, List[torch.Tensor]] = {}
    for t in tensors:
        if t is not None and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    return all(bool(torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all())
               for ts in groups.values())


class StepGuard:
    """Makes `optimizer.step()` refuse an update whose gradients hold NaN/inf (or that the trainer
    marked with `skip_next`), counting it in `skipped`, and flag weights that come out of a step
    non-finite (`bad_weights`). DeepSpeed calls this step on the (fp32 master) parameters under
    every ZeRO stage. The instance's step is replaced (DeepSpeed checks the optimizer's exact type,
    so no subclass), after the LR scheduler's own wrapper; `_opt_called`, `overflow` and
    `_wrapped_by_lr_sched` are what torch's scheduler and DeepSpeed read: `overflow` tells
    DeepSpeed without ZeRO to treat a refused step as an fp16 overflow (the schedule holds)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip_next, self.skipped, self.bad_weights = False, 0, False
        inner = optimizer.step

        def step(*args, **kwargs):
            optimizer._opt_called = True  # what the LR scheduler's wrapper records
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if self.skip_next or not all_finite([p.grad for p in params]):
                self.skip_next = False
                self.skipped += 1
                optimizer.overflow = True
                return None
            optimizer.overflow = False
            out = inner(*args, **kwargs)
            if not all_finite(params):
                self.bad_weights = True
            return out

        step._wrapped_by_lr_sched = True
        optimizer.step = step
        optimizer.overflow = False


# ----------------------------------------------------------------------------- ZeRO-3 parameters

def full_numel(p: torch.Tensor) -> int:
    """The size of a parameter; ZeRO-3 leaves an empty placeholder and keeps the full size aside."""
    return getattr(p, "ds_numel", p.numel())


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition, or the whole parameter."""
    return getattr(p, "ds_tensor", p)


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gathered_parameters(module: nn.Module, zero3: bool):
    """A context in which every parameter of `module` is whole on every rank (read-only)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


# ----------------------------------------------------------------------------- engines

class TrainedEngine:
    """A model trained through DeepSpeed: the engine (`engine`), its optimizer and the guard of its
    step. Called like the model (the engine's forward, so ZeRO-3 hooks run); `module` is the model
    itself (HF, PEFT or RewardModel)."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, guard: StepGuard):
        self.engine, self.optimizer, self.guard = engine, optimizer, guard

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def training(self) -> bool:
        return self.engine.training

    def train(self, mode: bool = True) -> "TrainedEngine":
        self.engine.train(mode)
        return self

    def eval(self) -> "TrainedEngine":
        return self.train(False)

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def backward(self, loss: torch.Tensor, last_pass: bool = True) -> None:
        """`engine.backward(loss)`. last_pass=False: more passes of the same micro-batch follow
        (packed rows under a token budget), so this one is kept off the accumulation boundary
        (no gradient reduction yet; the micro-batch's last pass and `step` do as usual)."""
        if last_pass:
            self.engine.backward(loss)
            return
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            self.engine.backward(loss)
        finally:
            self.engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own counting

    def step(self, skip: bool = False) -> Optional[bool]:
        """`engine.step()`. Off an accumulation boundary: None. On one: whether the update was
        applied (False: NaN/inf gradients, or `skip`, e.g. the trainer saw a NaN/inf loss; the
        weights are unchanged). An fp16 loss-scale overflow is DeepSpeed's business and counts as
        applied."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        before = self.guard.skipped
        if boundary:
            self.guard.skip_next = skip
        self.engine.step()
        self.guard.skip_next = False
        if not boundary:
            return None
        refused = self.guard.skipped > before
        return not (refused or skip or (not self.engine.fp16_enabled() and not self.engine.was_step_applied()))

    def get_lr(self) -> List[float]:
        return self.engine.get_lr()

    @property
    def bad_weights(self) -> bool:
        """A step left NaN/inf weights (this rank's)."""
        return self.guard.bad_weights

    def weights_finite(self) -> bool:
        """Collective: no rank's (partition of the) weights holds NaN/inf."""
        return all_ranks_true(all_finite([local_shard(p) for p in self.module.parameters()]))

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full module state dict on rank 0 (ZeRO-3 partitions gathered; collective), None elsewhere."""
        if self.zero3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if is_rank0() else None
        if not is_rank0():
            return None
        return {k: v for k, v in self.module.state_dict().items()}

    def save_state(self, path: str, tag: str) -> None:
        """DeepSpeed's own state (weights, optimizer, scheduler) under path/tag; collective."""
        self.engine.save_checkpoint(path, tag=tag)

    def load_state(self, path: str, tag: str) -> bool:
        """Restore what `save_state` wrote; False when DeepSpeed found nothing to load."""
        loaded, _ = self.engine.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        return loaded is not None


def initialize_engine(model: nn.Module, cfg, ds_config: Dict[str, Any], total_steps: int, *,
                      lr: Optional[float] = None, warmup: Optional[int] = None) -> TrainedEngine:
    """`deepspeed.initialize` with our optimizer and schedule over `total_steps` optimizer steps.
    `lr` and `warmup` default to cfg.learning_rate and cfg.warmup_steps / warmup_ratio."""
    import deepspeed
    optimizer = make_optimizer(model, cfg, ds_config, cfg.learning_rate if lr is None else lr)
    warmup = warmup_steps_for(cfg, total_steps) if warmup is None else warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup, total_steps, cfg.lr_scheduler))
    guard = StepGuard(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return TrainedEngine(engine, optimizer, guard)


def frozen_engine(module: nn.Module, ds_config: Dict[str, Any], device: torch.device):
    """A model that is only run forward: a ZeRO-3 inference engine when ds_config asks for stage 3
    (its weights partitioned like the trained ones), else the module on the device."""
    module.requires_grad_(False)
    module.eval()
    if zero_stage(ds_config) == 3:
        import deepspeed
        ds = {k: v for k, v in ds_config.items() if k != "gradient_clipping"}
        engine, *_ = deepspeed.initialize(model=module, config=ds)
        engine.eval()
        return engine
    return module.to(device)
