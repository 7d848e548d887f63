"""The spine every trainer runs on (SFT, reward model, DPO, PPO/GRPO/RLOO): `Trainer`, the step
loop (progress bar, logging every `log_steps`, eval every `eval_steps`, checkpoints every
`save_steps` in the one format of `checkpoint.py`, resume, SIGTERM/SIGINT = save and exit) and
the run driver (eval before, train, eval after, save). It also guards the run: a checkpoint is
resumed only by the run that made it (its fingerprint), and a step whose loss or gradients are
NaN/inf is skipped (`ds_engine.StepGuard` refuses such an update); `max_nonfinite_steps` skipped
steps in a row, or NaN/inf weights, stop the run (`TrainingDiverged`) without writing the broken
model. A trainer subclasses it and supplies one optimizer step (`train_step`), `evaluate`, its
trained engines and whatever extra state it must carry across a resume. The run's setup (process
group, seeds, DeepSpeed config, the output dir's lock) is `run_setup.setup_run`'s.
"""
from __future__ import annotations

import abc
import json
import os
import shutil
import signal
import threading
from typing import Any, Dict, List, Optional

from ..errors import ConfigError, TrainingDiverged
from ..utils.distributed import all_ranks_true, is_rank0
from ..utils.logging import json_safe, print_rank0, progress_bar
from . import checkpoint as ckpt_lib
from .run_setup import RunContext, check_resume, read_run_file, trainer_kind, write_run_file
from .fingerprint import run_fingerprint


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
            self._fingerprint = self.ctx.fingerprint or run_fingerprint(
                self.cfg, self.ctx.kind or trainer_kind(self.cfg))
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
            if not all_ranks_true(not engine.bad_weights) or (when != "step" and not engine.weights_finite()):
                what = f"the {role} weights became NaN/inf at step {self.step} (the update was too large)"
                if when != "step":
                    what = f"the {role} weights hold NaN/inf at step {self.step}; {when} was not written"
                raise self.diverged_error(f"{what}: {self.divergence_hint()}; {self._checkpoint_note()}")

    def _record(self, status: str, **extra: Any) -> None:
        """fastrlhf_run.json: the kind of run that writes this dir and how it stands (rank 0)."""
        if is_rank0() and (self._saved or read_run_file(self.cfg.output_dir).get("trainer") == self.ctx.kind):
            write_run_file(self.cfg.output_dir, self.ctx.kind, status, step=self.step,
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
