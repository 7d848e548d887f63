"""The training machinery SFT and reward-model training share (PPO reuses the pieces):

- `setup_run(cfg)`: process group, seeds, DeepSpeed config, output dir, metrics logger.
- `make_optimizer`, `make_lr_scheduler`, `initialize_engine`: `deepspeed.initialize` with torch
  AdamW (DeepSpeedCPUAdam when offloading) and a warmup + cosine/linear/constant schedule that
  DeepSpeed steps and checkpoints.
- `GlobalBatchSampler`: a seeded shuffle cut into global batches, each split into micro-batches
  per rank and accumulation step. The global batch of step k is the same whatever the world size
  and accumulation, so 1- and 2-process runs see the same data, and a resumed run continues
  exactly where the checkpoint was taken.
- `eval_batches`: the eval set sharded over ranks with equal batch counts (ZeRO-3 forwards are
  collective), padded batches carrying weight 0.
- `run_training`: the step loop (accumulation, logging, periodic eval/save, resume).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import build_ds_config, ds_precision, save_config
from ..utils.distributed import all_reduce_sum, barrier, get_rank, get_world_size, init_distributed, is_rank0
from ..utils.logging import MetricsLogger, print_rank0, progress_bar, quiet_libraries
from . import checkpoint as ckpt_lib


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup_run(cfg) -> RunContext:
    quiet_libraries()
    device = init_distributed()
    if device.type == "cpu" and getattr(cfg, "cpu_threads", None):
        torch.set_num_threads(cfg.cpu_threads)
    world = get_world_size()
    ds_config = build_ds_config(cfg, world)
    seed_everything(cfg.seed)
    if is_rank0():
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "training_config.yaml"))
    barrier()
    tb_dir = cfg.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard")
    return RunContext(cfg=cfg, device=device, rank=get_rank(), world_size=world, ds_config=ds_config,
                      micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
                      accumulation=ds_config["gradient_accumulation_steps"],
                      global_batch_size=ds_config["train_batch_size"], metrics=MetricsLogger(tb_dir))


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


def make_optimizer(model: nn.Module, cfg, ds_config: Dict[str, Any]) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = tuple(cfg.adam_betas)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    # with GPUs, offloaded optimizer states want DeepSpeed's vectorised CPU Adam; on a CPU-only
    # machine everything is on the CPU already and JIT-building that op only costs minutes
    if offload and torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=betas, adamw_mode=True)
        except Exception as e:  # building the op needs a compiler; torch AdamW still works
            print_rank0(f"DeepSpeedCPUAdam unavailable ({type(e).__name__}: {e}); using torch AdamW")
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused or None)


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


def make_lr_scheduler(optimizer, cfg, total_steps: int):
    warmup = warmup_steps_for(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup, total_steps, cfg.lr_scheduler))


def initialize_engine(model: nn.Module, cfg, ctx: RunContext, total_steps: int):
    """`deepspeed.initialize` with our optimizer and schedule; returns the engine."""
    import deepspeed
    optimizer = make_optimizer(model, cfg, ctx.ds_config)
    scheduler = make_lr_scheduler(optimizer, cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ctx.ds_config)
    return engine


# ----------------------------------------------------------------------------- data order

class GlobalBatchSampler:
    """Micro-batches of indices for one rank: permutation(seed, epoch) -> global batches (last
    partial one dropped) -> each split into accumulation x world micro-batches, micro-batch
    (a * world + rank) going to this rank at accumulation step a."""

    def __init__(self, num_items: int, micro: int, accumulation: int, world: int, rank: int, seed: int,
                 shuffle: bool = True):
        self.num_items, self.micro, self.accum, self.world, self.rank = num_items, micro, accumulation, world, rank
        self.global_batch = micro * accumulation * world
        self.seed, self.shuffle = seed, shuffle
        if num_items < self.global_batch:
            raise ValueError(f"the training set has {num_items} examples, fewer than one global batch "
                             f"({self.global_batch}); lower --global_batch_size/--micro_batch_size or add data")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator().manual_seed(self.seed + 100_003 * epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def micro_batches(self, epoch: int, start: int = 0) -> Iterator[List[int]]:
        """This rank's micro-batches of `epoch`, skipping the first `start` (resume)."""
        order = self.epoch_order(epoch)
        for i in range(start, self.micro_batches_per_epoch):
            step, a = divmod(i, self.accum)
            chunk = step * self.global_batch + (a * self.world + self.rank) * self.micro
            yield order[chunk:chunk + self.micro]


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


# ----------------------------------------------------------------------------- the loop

StepFn = Callable[[Any, Dict[str, Any]], torch.Tensor]


def total_train_steps(cfg, steps_per_epoch: int) -> int:
    total = cfg.num_epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def run_training(*, engine, ctx: RunContext, train_dataset, collate: Callable, loss_fn: StepFn,
                 evaluate: Callable[[], Dict[str, float]], sampler: GlobalBatchSampler, total_steps: int,
                 tokenizer=None, desc: str = "train") -> Dict[str, Any]:
    """Train `engine` for `total_steps` optimizer steps; returns {"losses": {step: loss}, "step": n}.

    `loss_fn(engine, batch)` returns the micro-batch loss (the engine scales it for accumulation).
    """
    cfg = ctx.cfg
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    resume_dir = ckpt_lib.find_resume_checkpoint(cfg.output_dir, cfg.resume)
    if resume_dir:
        state.update(ckpt_lib.load_training_checkpoint(engine, resume_dir))
        print_rank0(f"resumed from {resume_dir} at step {state['step']}")
    losses: Dict[int, float] = {}
    bar = progress_bar(total_steps, desc, initial=min(state["step"], total_steps))
    engine.train()
    loss_sum, micro_count, t0 = 0.0, 0, time.time()
    while state["step"] < total_steps:
        for idx in sampler.micro_batches(state["epoch"], state["micro_in_epoch"]):
            batch = to_device(collate([train_dataset[i] for i in idx]), engine.device)
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().item()
            micro_count += 1
            state["micro_in_epoch"] += 1
            if state["micro_in_epoch"] % sampler.accum:
                continue
            state["step"] += 1
            step = state["step"]
            step_loss = all_reduce_sum(torch.tensor([loss_sum, micro_count], dtype=torch.float64))
            losses[step] = float(step_loss[0] / step_loss[1])
            loss_sum, micro_count = 0.0, 0
            bar.update(1)
            bar.set_postfix(loss=f"{losses[step]:.4f}")
            if step % max(1, cfg.log_steps) == 0 or step == total_steps:
                lr = engine.get_lr()[0]
                ctx.metrics.log({"train/loss": losses[step], "train/lr": lr,
                                 "train/samples_per_s": ctx.global_batch_size * cfg.log_steps / max(
                                     1e-9, time.time() - t0)}, step)
                t0 = time.time()
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step != total_steps:
                engine.eval()
                ctx.metrics.log({f"eval/{k}": v for k, v in evaluate().items()}, step)
                engine.train()
            if cfg.save_steps and (step % cfg.save_steps == 0 or step == total_steps):
                saved = dict(state)
                if saved["micro_in_epoch"] >= sampler.micro_batches_per_epoch:
                    saved.update(epoch=saved["epoch"] + 1, micro_in_epoch=0)
                ckpt_lib.save_training_checkpoint(engine, cfg.output_dir, saved, tokenizer=tokenizer,
                                                  merge_lora=cfg.merge_lora_on_save,
                                                  save_total_limit=cfg.save_total_limit)
            if step >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
    bar.close()
    return {"losses": losses, "step": state["step"]}


def describe_run(ctx: RunContext, model: nn.Module, n_train: int, n_eval: int, total_steps: int) -> None:
    def numel(p):  # ZeRO-3 leaves an empty placeholder; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())
    n_params = sum(numel(p) for p in model.parameters())
    n_train_params = sum(numel(p) for p in model.parameters() if p.requires_grad)
    print_rank0(f"{n_params / 1e6:.2f}M parameters ({n_train_params / 1e6:.2f}M trainable), "
                f"{n_train} train / {n_eval} eval examples, {total_steps} steps of {ctx.global_batch_size} "
                f"(micro {ctx.micro_batch_size} x accumulation {ctx.accumulation} x {ctx.world_size} processes), "
                f"ZeRO-{ctx.ds_config.get('zero_optimization', {}).get('stage', 0)}, {training_dtype(ctx)}")


def config_summary(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def run_supervised_step(cfg, *, step: int, label: str, load_model: Callable, default_collate: Callable,
                        loss_fn: Callable, evaluate_fn: Callable, fmt: Callable[[Dict[str, float]], str],
                        model=None, tokenizer=None, datasets=None, collate=None) -> Dict[str, Any]:
    """The driver shared by step 1 (SFT) and step 2 (reward model): load what was not passed in,
    evaluate, train through DeepSpeed, evaluate again, save in HF format to cfg.output_dir.

    `load_model(path, tokenizer=, dtype=, seed=, ds_config=)` builds the model; `evaluate_fn(engine,
    dataset, collate, batch_size, rank, world, max_batches)` returns a metrics dict that `fmt`
    renders for the before/after lines."""
    from ..models.loading import apply_lora_from_config, enable_gradient_checkpointing, load_tokenizer

    cfg.validate()
    ctx = setup_run(cfg)
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
    sampler = GlobalBatchSampler(len(train_ds), ctx.micro_batch_size, ctx.accumulation, ctx.world_size,
                                 ctx.rank, cfg.seed)
    total_steps = total_train_steps(cfg, sampler.steps_per_epoch)
    engine = initialize_engine(model, cfg, ctx, total_steps)
    describe_run(ctx, engine.module, len(train_ds), len(eval_ds), total_steps)
    eval_bs = cfg.eval_batch_size or ctx.micro_batch_size

    def evaluate() -> Dict[str, float]:
        return evaluate_fn(engine, eval_ds, collate, eval_bs, ctx.rank, ctx.world_size, cfg.eval_max_batches)

    before = evaluate()
    print_rank0(f"[{label}] eval before training: {fmt(before)}")
    ctx.metrics.log({f"eval/{k}": v for k, v in before.items()}, 0)
    result = run_training(engine=engine, ctx=ctx, train_dataset=train_ds, collate=collate, loss_fn=loss_fn,
                          evaluate=evaluate, sampler=sampler, total_steps=total_steps, tokenizer=tokenizer,
                          desc=label)
    after = evaluate()
    print_rank0(f"[{label}] eval after training:  {fmt(after)}")
    ctx.metrics.log({f"eval/{k}": v for k, v in after.items()}, result["step"])
    ckpt_lib.save_hf_model(engine, cfg.output_dir, tokenizer=tokenizer, merge_lora=cfg.merge_lora_on_save)
    print_rank0(f"[{label}] model saved to {cfg.output_dir}")
    ctx.metrics.close()
    return {"eval_before": before, "eval_after": after, "losses": result["losses"], "steps": result["step"],
            "output_dir": cfg.output_dir, "engine": engine}
