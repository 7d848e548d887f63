"""Trainers for a loss over a fixed dataset (SFT, reward model, DPO): `SupervisedTrainer`
accumulates the rank's micro-batches of one global batch per optimizer step, and `run_supervised`
drives it (load what was not passed in, build the engine, run).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..utils.distributed import all_ranks_true, all_reduce_sum
from .batches import GlobalBatchSampler, eval_sums, to_device, total_train_steps
from .ds_engine import initialize_engine
from .packing import check_budget, check_models, longest_item, plan_passes, select_rows
from .run_setup import RunContext, describe_run, setup_run, training_dtype
from .trainer import Trainer


LossFn = Callable[[Any, Dict[str, Any]], torch.Tensor]


class SupervisedTrainer(Trainer):
    """A loss over a fixed dataset (SFT, reward model, DPO): each optimizer step accumulates
    the rank's micro-batches of one global batch; the data position is the resumable state.

    `loss_fn(engine, batch)` is the micro-batch loss (the engine scales it for accumulation);
    `evaluate_fn(trainer)` returns the eval metrics; `fmt(metrics)` renders them on one line.
    With --packing, `loss_fn(engine, part, packed=True)` is the mean loss of a pass's rows, weighed
    by its share of the micro-batch's `denominator(batch)` (labelled tokens, pairs); `pairs`: the
    batch is B chosen rows then their B rejected twins, kept in one pass."""

    def __init__(self, cfg, ctx: RunContext, *, engine, tokenizer, sampler: GlobalBatchSampler, train_dataset,
                 eval_dataset, collate, loss_fn: LossFn, evaluate_fn: Callable[["SupervisedTrainer"], Dict[str, float]],
                 fmt: Callable[[Dict[str, float]], str], label: str,
                 denominator: Optional[Callable[[Dict[str, Any]], float]] = None, pairs: bool = False):
        super().__init__(cfg, ctx, tokenizer)
        self.engine, self.sampler, self.collate = engine, sampler, collate
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.loss_fn, self.evaluate_fn, self.fmt, self.label = loss_fn, evaluate_fn, fmt, label
        self.denominator, self.pairs = denominator, pairs
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
            passes = self.passes(batch)
            for k, (part, weight) in enumerate(passes):
                loss = self.loss_fn(self.engine, part, packed=True) * weight if self.cfg.packing else \
                    self.loss_fn(self.engine, part)
                value = loss.detach().float().item()
                bad_loss = bad_loss or not math.isfinite(value)
                self.engine.backward(loss, last_pass=k == len(passes) - 1)
                total += value
            if n == len(micro_batches) - 1:  # the step is skipped on every rank, or on none
                bad_loss = not all_ranks_true(not bad_loss)
            applied = self.engine.step(skip=bad_loss) is not False and applied
        self.count_nonfinite("loss" if bad_loss else None if applied else "gradients")
        summed = all_reduce_sum(torch.tensor([total, len(micro_batches)], dtype=torch.float64))
        return {"loss": float(summed[0] / summed[1]), "lr": self.engine.get_lr()[0],
                "samples_per_s": self.ctx.global_batch_size / max(1e-9, time.perf_counter() - t0),
                "nonfinite_steps": float(self.nonfinite_total)}

    def passes(self, batch: Dict[str, Any]) -> List[Tuple[Dict[str, Any], float]]:
        """(rows, weight) per pass: the whole micro-batch, or packed rows under the token budget,
        each weighed by its share of the micro-batch's loss denominator."""
        budget = self.cfg.max_tokens_per_micro_batch if self.cfg.packing else None
        if budget is None:
            return [(batch, 1.0)]
        rows_of = plan_passes(batch["attention_mask"].sum(1).tolist(), budget, self.pairs)
        if len(rows_of) == 1:
            return [(batch, 1.0)]
        total = max(self.denominator(batch), 1.0)
        parts = [select_rows(batch, rows) for rows in rows_of]
        return [(part, self.denominator(part) / total) for part in parts]

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
                   denominator: Callable[[Dict[str, Any]], float],
                   prepare_model: Optional[Callable[[nn.Module, RunContext, Any], None]] = None,
                   model=None, tokenizer=None, datasets=None, collate=None) -> Dict[str, Any]:
    """The driver of the fixed-dataset trainers: load what was not passed in, build the engine,
    then `SupervisedTrainer.run()`. `step` picks the data split (1: SFT items, 2: preference pairs);
    `load_model(path, tokenizer=, dtype=, seed=, ds_config=)` builds the model and
    `prepare_model(model, ctx, tokenizer)` may adjust it (or load companions such as DPO's frozen
    reference) before the engine is built. `denominator(batch)` is what loss_fn divides by (the
    weight of a packed pass)."""
    from ..models.loading import apply_lora_from_config, enable_gradient_checkpointing, load_tokenizer

    ctx = setup_run(cfg, check_tokenizers=tokenizer is None)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or cfg.model_name_or_path)
    if datasets is None:
        from ..data import build_datasets
        datasets = build_datasets(cfg.data, tokenizer, step)
    train_ds, eval_ds = datasets
    if cfg.packing:
        check_budget(cfg.max_tokens_per_micro_batch, longest_item(train_ds, step == 2),
                     "the longest pair (chosen + rejected) of the training data" if step == 2 else
                     "the longest sequence of the training data")
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
    if cfg.packing:
        check_models({"model": engine}, ctx, recompute=cfg.gradient_checkpointing)
    trainer = SupervisedTrainer(cfg, ctx, engine=engine, tokenizer=tokenizer, sampler=sampler, train_dataset=train_ds,
                                eval_dataset=eval_ds, collate=collate, loss_fn=loss_fn, evaluate_fn=evaluate_fn,
                                fmt=fmt, label=label, denominator=denominator, pairs=step == 2)
    describe_run(ctx, engine.module, len(train_ds), len(eval_ds), trainer.total_steps)
    result = trainer.run()
    result.update(losses=trainer.losses, engine=engine)
    return result
