"""`TrainConfig`: the options every trainer shares (model, data, precision, ZeRO, batch sizes,
schedule, LoRA, checkpoints, logging) and their checks.

Each trainer's own config derives from it and lives beside the others in
`fastrlhf.rlhf.configs` (`SFTConfig`, `RMConfig`, `PPOConfig`, `DPOConfig`). The files, flags and
validation machinery are generic and live in `fastrlhf.options`; the DeepSpeed config built from
these options, in `fastrlhf.rlhf.ds_engine` (`build_ds_config`). This module only reads the
user's own DeepSpeed JSON (`read_deepspeed_config`) to check it before anything runs.

    cfg = config_from_dict(SFTConfig, {"data": {"max_prompt_len": 64}})
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from .data import DataSpec
from .errors import ConfigError
from .models.paths import check_model_path
from .options import Range, above, at_least, fraction, option, validate_config
from .utils.trackers import check_report_to


@dataclass
class TrainConfig:
    """Options shared by every training step (SFT, reward model, PPO)."""
    model_name_or_path: Optional[str] = option(None, "HF model name or local dir; unset = the bundled tiny default")
    tokenizer: Optional[str] = option(None, "tokenizer name or dir; unset = same as the model")
    output_dir: str = option("output", "where checkpoints, the final model and logs are written", fingerprint=False)
    data: DataSpec = option(None, "dataset options (see fastrlhf.data.DataSpec)", factory=DataSpec)
    seed: int = option(1234, "seed for model init, shuffling and dropout")
    dtype: str = option("fp32", "training precision", choices=("fp32", "bf16", "fp16"))
    zero_stage: int = option(0, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    offload: str = option("none", "offload optimizer (and, with ZeRO-3, parameters) to the CPU",
                           choices=("none", "cpu"))
    micro_batch_size: int = option(8, "sequences per process per forward pass")
    global_batch_size: Optional[int] = option(None, "sequences per optimizer step over all processes; "
                                               "unset = micro_batch_size * world size (no accumulation)")
    eval_batch_size: Optional[int] = option(None, "sequences per process per eval pass; unset = micro_batch_size",
                                            fingerprint=False)
    learning_rate: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_betas: List[float] = option(None, "AdamW betas", factory=lambda: [0.9, 0.95])
    lr_scheduler: str = option("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(0, "linear warmup steps (wins over warmup_ratio when > 0)")
    warmup_ratio: float = option(0.0, "warmup as a fraction of the total optimizer steps")
    num_epochs: int = option(1, "passes over the training data", fingerprint=False)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps (caps num_epochs)", fingerprint=False)
    gradient_clipping: float = option(1.0, "max gradient norm (0 = no clipping)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory", fingerprint=False)
    packing: bool = option(False, "train without padding: the sequences of a micro-batch packed into rows with "
                           "positions restarting per sequence (same losses as padded; eval stays padded)",
                           fingerprint=False)
    max_tokens_per_micro_batch: Optional[int] = option(None, "with --packing: run each micro-batch as passes of "
                                                       "packed rows of at most this many tokens (a sequence, or a "
                                                       "preference pair, is never split); unset = one row per "
                                                       "micro-batch", fingerprint=False)
    lora_rank: int = option(0, "LoRA rank (0 = no LoRA, full fine-tuning)")
    lora_alpha: float = option(16.0, "LoRA alpha (scaling = alpha / rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_target_modules: Optional[List[str]] = option(None, "linear-layer names or regexes to adapt; unset = "
                                                       "the usual attention/MLP projections")
    only_optimize_lora: bool = option(False, "freeze all but the LoRA parameters")
    merge_lora_on_save: bool = option(True, "fold LoRA into the weights of saved checkpoints (plain HF models)",
                                      fingerprint=False)
    save_steps: int = option(0, "save a resumable checkpoint every N optimizer steps (0 = only at the end)",
                             fingerprint=False)
    save_total_limit: int = option(2, "keep only the newest N step checkpoints (0 = keep all)", fingerprint=False)
    eval_steps: int = option(0, "evaluate every N optimizer steps (0 = only before and after training)",
                             fingerprint=False)
    eval_max_batches: Optional[int] = option(None, "cap on eval batches (unset = the whole eval split)",
                                             fingerprint=False)
    log_steps: int = option(10, "log the training loss every N optimizer steps", fingerprint=False)
    tensorboard_dir: Optional[str] = option(None, "tensorboard log dir (metrics.jsonl goes there too); unset = "
                                            "<output_dir>/tensorboard", fingerprint=False)
    report_to: List[str] = option(None, "experiment trackers that get every metric and the run's config: "
                                  "tensorboard, wandb, mlflow (several allowed; wandb and mlflow are extras: "
                                  'pip install -e ".[wandb]"), or none', factory=lambda: ["tensorboard"],
                                  fingerprint=False)
    resume: str = option("auto", "'auto' = continue from the newest checkpoint in output_dir if any, "
                          "'no' = start fresh, or a checkpoint dir", fingerprint=False)
    overwrite_output_dir: bool = option(False, "allow writing into a non-empty output_dir that fastrlhf did not "
                                         "write, or that holds another kind of model (e.g. an SFT run into a "
                                         "reward-model dir); files of other names are never deleted",
                                         fingerprint=False)
    max_nonfinite_steps: int = option(3, "stop when this many consecutive steps had a NaN/inf loss or gradient "
                                       "(each such step is skipped)", fingerprint=False)
    cpu_threads: Optional[int] = option(None, "torch intra-op threads when training on the CPU; unset = torch's "
                                         "default (one per core)", fingerprint=False)
    deepspeed_config: Optional[str] = option(None, "your own DeepSpeed JSON; replaces the generated one "
                                              "('auto' values are filled in from this config)", fingerprint=False)

    # the sane values of every numeric option (validate_config checks them; --help shows them)
    RANGES: ClassVar[Dict[str, Range]] = {
        "seed": Range(0, 2 ** 32, high_open=True),
        "micro_batch_size": at_least(1), "global_batch_size": at_least(1), "eval_batch_size": at_least(1),
        "learning_rate": above(0), "weight_decay": at_least(0), "adam_betas": fraction(),
        "warmup_steps": at_least(0), "warmup_ratio": fraction(), "num_epochs": at_least(1),
        "max_steps": at_least(1), "gradient_clipping": at_least(0, "0 = no clipping"),
        "lora_rank": at_least(0, "0 = no LoRA"), "lora_alpha": above(0), "lora_dropout": fraction(),
        "save_steps": at_least(0, "0 = only at the end"), "save_total_limit": at_least(0, "0 = keep all"),
        "eval_steps": at_least(0, "0 = only before and after training"), "eval_max_batches": at_least(1),
        "log_steps": at_least(1), "cpu_threads": at_least(1), "max_nonfinite_steps": at_least(1),
        "max_tokens_per_micro_batch": at_least(1),
    }
    # the kind of model model_name_or_path must be (models.paths.check_model_path)
    MODEL_KIND: ClassVar[str] = "policy"

    def validate(self) -> None:
        """Checks of the values alone (and of the files they name): run whenever a config is built."""
        validate_config(self)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas takes two numbers (beta1 beta2), got {self.adam_betas}")
        if self.max_tokens_per_micro_batch is not None and not self.packing:
            raise ConfigError("--max_tokens_per_micro_batch sets the size of packed rows: add --packing (or drop it)")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError("offload=cpu needs ZeRO: set --zero_stage 1, 2 or 3 (or --offload none)")
        if self.only_optimize_lora and self.lora_rank == 0 and not (
                self.model_name_or_path and os.path.isfile(os.path.join(self.model_name_or_path,
                                                                        "adapter_config.json"))):
            raise ConfigError("only_optimize_lora needs LoRA: set --lora_rank > 0 (e.g. 8), pass a PEFT adapter "
                              "dir as the model, or drop --only_optimize_lora")
        check_report_to(self.report_to)
        if self.resume not in ("auto", "no") and not os.path.isdir(self.resume):
            raise ConfigError(f"resume={self.resume!r} is neither 'auto', 'no' nor an existing checkpoint dir")
        if self.deepspeed_config:
            read_deepspeed_config(self.deepspeed_config)

    def model_inputs(self) -> List[Tuple[str, Optional[str], str]]:
        """(option, path, expected kind) of every model this run loads (see check_model_path)."""
        return [("--model_name_or_path", self.model_name_or_path, self.MODEL_KIND)]

    def tokenizer_inputs(self) -> List[Tuple[str, Optional[str]]]:
        """(option, path) of every tokenizer this run loads when none is passed in."""
        if self.tokenizer:
            return [("--tokenizer", self.tokenizer)]
        return [("--model_name_or_path", self.model_name_or_path)]

    def check_inputs(self, produced: Sequence[str] = (), tokenizers: bool = False) -> None:
        """Checks against this machine, before anything loads or is written: every model path is
        there and of the right kind, the output dir can be made, the precision runs here.
        `produced`: dirs an earlier step of the same pipeline will write (not checked yet);
        `tokenizers`: also check the tokenizer paths (the command line always loads them)."""
        made = {os.path.abspath(p) for p in produced}
        check_output_not_an_input(self.output_dir, self.model_inputs() + [
            (flag, path, "tokenizer") for flag, path in self.tokenizer_inputs()])
        for flag, path, kind in self.model_inputs():
            if not (path and os.path.abspath(path) in made):
                check_model_path(path, kind, option=flag)
        if tokenizers:
            for flag, path in self.tokenizer_inputs():
                if not (path and os.path.abspath(path) in made):
                    check_model_path(path, "tokenizer", option=flag)
        check_output_dir(self.output_dir)
        check_report_to(self.report_to, installed=True)
        fp16 = self.dtype == "fp16"
        if self.deepspeed_config:  # the file decides; its "auto" means this config's dtype
            section = read_deepspeed_config(self.deepspeed_config).get("fp16")
            enabled = section.get("enabled") if isinstance(section, Mapping) else None
            fp16 = enabled is True or (enabled == "auto" and self.dtype == "fp16")
        if fp16:
            import torch
            if not torch.cuda.is_available():
                raise ConfigError("fp16 training needs a CUDA GPU (DeepSpeed has no fp16 on the CPU) and none is "
                                  "visible here; use --dtype fp32 or bf16")


# what a run writes (or deletes) inside its output_dir: an input model there would be overwritten
_RUN_WRITES_INSIDE = re.compile(r"(checkpoint-\d+.*|actor|critic|actor_ema)$")


def check_output_not_an_input(output_dir: str, inputs: Sequence[Tuple[str, Optional[str], str]]) -> None:
    """The output dir must not be one of the run's input models (it would be overwritten while, or
    after, it is read), nor hold one where the run writes (checkpoint-<N>/, actor/, ...)."""
    out = os.path.realpath(output_dir)
    for flag, path, _ in inputs:
        if not path or not os.path.isdir(path):
            continue
        real = os.path.realpath(path)
        if real == out:
            raise ConfigError(f"--output_dir {output_dir} is the input model of {flag} {path}: the run would "
                              f"overwrite it; write to another --output_dir")
        inside = os.path.relpath(real, out).split(os.sep)[0]
        if not real.startswith(out + os.sep) or not _RUN_WRITES_INSIDE.match(inside):
            continue
        raise ConfigError(f"{flag} {path} lies inside --output_dir {output_dir}, where this run writes "
                          f"({inside}/ may be replaced or deleted): copy the model elsewhere, or write to "
                          "another --output_dir")


def check_output_dir(path: str) -> None:
    """The output dir must be a directory this process can create or write into."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ConfigError(f"output_dir {path!r} is a file, not a directory. Fix: pass another --output_dir "
                          f"or move the file")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"output_dir {path!r} cannot be created: {existing} is a file. Fix: pass another "
                          f"--output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path!r} cannot be written: no write permission in {existing}. Fix: pass "
                          f"a writable --output_dir")


def read_deepspeed_config(path: str) -> Dict[str, Any]:
    """The user's DeepSpeed JSON as a dict, or a one-line ConfigError naming the file and the position."""
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed_config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {path}: not valid JSON at line {e.lineno}, column {e.colno}: "
                          f"{e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed_config {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed_config {path} must hold a JSON object ({{...}}), got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- generic machinery


# ----------------------------------------------------------------------------- DeepSpeed config
