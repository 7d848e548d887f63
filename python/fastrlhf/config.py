"""Typed run configuration: dataclasses, YAML/JSON files, command-line overrides, DeepSpeed config.

`TrainConfig` holds the options every trainer shares; each trainer's own config derives from it
and lives beside the others in `fastrlhf.rlhf.configs` (`SFTConfig`, `RMConfig`, `PPOConfig`,
`DPOConfig`). The generic machinery works on ANY dataclass:

    cfg = parse_config(MyConfig, ["--config", "run.yaml", "--lr", "1e-4", "--data.max_prompt_len", "64"])
    cfg = config_from_dict(MyConfig, {"data": {"max_prompt_len": 64}})   # nested dicts -> nested dataclasses
    add_dataclass_arguments(parser, MyConfig)                            # argparse options, dotted for nesting
    ds = build_ds_config(cfg, world_size)                                # DeepSpeed JSON as a dict

Field metadata understood by the machinery: `help` (shown by --help) and `choices` (validated).
Unknown keys and bad values raise `ConfigError` (a ValueError) naming the key and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from .data import DataSpec

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says which key and how."""


@dataclass(frozen=True)
class Range:
    """The sane values of a numeric option (each element, for a list): `low`/`high` bounds,
    excluded when `*_open`; `hint` is added to the error message."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{num(self.low)}, {num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {num(self.low)}"
        return f"{'<' if self.high_open else '<='} {num(self.high)}" if self.high is not None else "finite"


def at_least(low: float, hint: str = "") -> Range:
    return Range(low=low, hint=hint)


def above(low: float, hint: str = "") -> Range:
    return Range(low=low, low_open=True, hint=hint)


def fraction(high_open: bool = True, low_open: bool = False, hint: str = "") -> Range:
    """[0, 1) by default."""
    return Range(0.0, 1.0, low_open=low_open, high_open=high_open, hint=hint)


def _opt(default, help: str, choices: Optional[Sequence[Any]] = None, factory=None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Options shared by every training step (SFT, reward model, PPO)."""
    model_name_or_path: Optional[str] = _opt(None, "HF model name or local dir; unset = the bundled tiny default")
    tokenizer: Optional[str] = _opt(None, "tokenizer name or dir; unset = same as the model")
    output_dir: str = _opt("output", "where checkpoints, the final model and logs are written")
    data: DataSpec = _opt(None, "dataset options (see fastrlhf.data.DataSpec)", factory=DataSpec)
    seed: int = _opt(1234, "seed for model init, shuffling and dropout")
    dtype: str = _opt("fp32", "training precision", choices=("fp32", "bf16", "fp16"))
    zero_stage: int = _opt(0, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    offload: str = _opt("none", "offload optimizer (and, with ZeRO-3, parameters) to the CPU",
                        choices=("none", "cpu"))
    micro_batch_size: int = _opt(8, "sequences per process per forward pass")
    global_batch_size: Optional[int] = _opt(None, "sequences per optimizer step over all processes; "
                                            "unset = micro_batch_size * world size (no accumulation)")
    eval_batch_size: Optional[int] = _opt(None, "sequences per process per eval pass; unset = micro_batch_size")
    learning_rate: float = _opt(1e-4, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norms)")
    adam_betas: List[float] = _opt(None, "AdamW betas", factory=lambda: [0.9, 0.95])
    lr_scheduler: str = _opt("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = _opt(0, "linear warmup steps (wins over warmup_ratio when > 0)")
    warmup_ratio: float = _opt(0.0, "warmup as a fraction of the total optimizer steps")
    num_epochs: int = _opt(1, "passes over the training data")
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps (caps num_epochs)")
    gradient_clipping: float = _opt(1.0, "max gradient norm (0 = no clipping)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    lora_rank: int = _opt(0, "LoRA rank (0 = no LoRA, full fine-tuning)")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scaling = alpha / rank)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_target_modules: Optional[List[str]] = _opt(None, "linear-layer names or regexes to adapt; unset = "
                                                    "the usual attention/MLP projections")
    only_optimize_lora: bool = _opt(False, "freeze all but the LoRA parameters")
    merge_lora_on_save: bool = _opt(True, "fold LoRA into the weights of saved checkpoints (plain HF models)")
    save_steps: int = _opt(0, "save a resumable checkpoint every N optimizer steps (0 = only at the end)")
    save_total_limit: int = _opt(2, "keep only the newest N step checkpoints (0 = keep all)")
    eval_steps: int = _opt(0, "evaluate every N optimizer steps (0 = only before and after training)")
    eval_max_batches: Optional[int] = _opt(None, "cap on eval batches (unset = the whole eval split)")
    log_steps: int = _opt(10, "log the training loss every N optimizer steps")
    tensorboard_dir: Optional[str] = _opt(None, "tensorboard log dir; unset = <output_dir>/tensorboard")
    resume: str = _opt("auto", "'auto' = continue from the newest checkpoint in output_dir if any, "
                       "'no' = start fresh, or a checkpoint dir")
    overwrite_output_dir: bool = _opt(False, "allow writing into an output_dir that holds another kind of model "
                                      "(e.g. an SFT run into a reward-model dir)")
    max_nonfinite_steps: int = _opt(3, "stop when this many consecutive steps had a NaN/inf loss or gradient "
                                    "(each such step is skipped)")
    cpu_threads: Optional[int] = _opt(None, "torch intra-op threads when training on the CPU; unset = torch's "
                                      "default (one per core)")
    deepspeed_config: Optional[str] = _opt(None, "your own DeepSpeed JSON; replaces the generated one "
                                           "('auto' values are filled in from this config)")

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
    }
    # the kind of model model_name_or_path must be (models.loading.check_model_path)
    MODEL_KIND: ClassVar[str] = "policy"

    def validate(self) -> None:
        """Checks of the values alone (and of the files they name): run whenever a config is built."""
        validate_config(self)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas takes two numbers (beta1 beta2), got {self.adam_betas}")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError("offload=cpu needs ZeRO: set --zero_stage 1, 2 or 3 (or --offload none)")
        if self.only_optimize_lora and self.lora_rank == 0 and not (
                self.model_name_or_path and os.path.isfile(os.path.join(self.model_name_or_path,
                                                                        "adapter_config.json"))):
            raise ConfigError("only_optimize_lora needs LoRA: set --lora_rank > 0 (e.g. 8), pass a PEFT adapter "
                              "dir as the model, or drop --only_optimize_lora")
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
        from .models.loading import check_model_path
        made = {os.path.abspath(p) for p in produced}
        for option, path, kind in self.model_inputs():
            if not (path and os.path.abspath(path) in made):
                check_model_path(path, kind, option=option)
        if tokenizers:
            for option, path in self.tokenizer_inputs():
                if not (path and os.path.abspath(path) in made):
                    check_model_path(path, "tokenizer", option=option)
        check_output_dir(self.output_dir)
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

def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def did_you_mean(key: str, known: Sequence[str], prefix: str = "") -> str:
    """'; did you mean X?' (the closest of `known`, each shown with `prefix`), or ''."""
    close = difflib.get_close_matches(key, list(known), n=3)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    hint = did_you_mean(key, known) or f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {where + key!r}{hint}")


def option_names(cls, prefix: str = "") -> List[str]:
    """Every option of dataclass `cls` as the command line spells it, without '--' (nested: 'data.paths')."""
    names = []
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            names += option_names(tp, prefix + f.name + ".")
        else:
            names.append(prefix + f.name)
    return names


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise ConfigError."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty (None)")
    origin = typing.get_origin(base)
    try:
        if origin in (list, List, tuple):
            (item_tp,) = typing.get_args(base)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce_value(v, item_tp, key) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                as_float = float(value)  # accept "1e3" but not "2.5"
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise ConfigError(f"{key}={value!r} is not a valid {name}") from None
    return value


def config_from_dict(cls: Type[T], values: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and bad values raise ConfigError."""
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), prefix)
        tp = hints[key]
        base, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(base):
            if dataclasses.is_dataclass(value):
                kwargs[key] = value
            elif isinstance(value, Mapping):
                kwargs[key] = config_from_dict(base, value, prefix=f"{prefix}{key}.")
            else:
                raise ConfigError(f"{prefix}{key} must be a mapping of {base.__name__} fields, got {value!r}")
        else:
            kwargs[key] = coerce_value(value, tp, prefix + key)
    obj = cls(**kwargs)
    if not prefix and callable(getattr(obj, "validate", None)):
        obj.validate()  # cross-field checks of the top-level config
    else:
        validate_config(obj, prefix)
    return obj


def validate_config(obj: Any, prefix: str = "") -> None:
    """Check every field with `choices` metadata, every number against the class's `RANGES`
    (lists element by element) and every float for being finite (recursively)."""
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{prefix}{f.name}={value!r} is not allowed; choose one of "
                              f"{', '.join(map(str, choices))}")
        if dataclasses.is_dataclass(value):
            validate_config(value, f"{prefix}{f.name}.")
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            rng = ranges.get(f.name, Range())
            if v not in rng:
                shown = value if isinstance(value, (list, tuple)) else v
                each = "each value of " if isinstance(value, (list, tuple)) else ""
                hint = f" ({rng.hint})" if rng.hint else ""
                raise ConfigError(f"{each}{prefix}{f.name} must be {rng}{hint}, got {shown}")


def update_config(obj: T, overrides: Mapping[str, Any]) -> T:
    """A copy of `obj` with (nested) overrides applied and validated."""
    merged = merge_dicts(config_to_dict(obj), overrides)
    return config_from_dict(type(obj), merged)


def config_to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def merge_dicts(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{"data.max_prompt_len": 64} -> {"data": {"max_prompt_len": 64}}."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a nested section")
        node[parts[-1]] = value
    return out


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON file into a dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is skipped
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({type(e).__name__}: {e})") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # parser errors carry the line number
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def save_config(obj: Any, path: str) -> None:
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(obj), f, sort_keys=False)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "",
                            skip: Sequence[str] = ()) -> None:
    """One `--name` option per field (nested dataclasses as `--section.name`). Values stay strings
    (argparse.SUPPRESS default, so only given options appear) and are typed by config_from_dict."""
    hints = _hints(cls)
    group = parser.add_argument_group(f"{prefix.rstrip('.') or cls.__name__} options") if not prefix else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _strip_optional(hints[f.name])
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            sub = parser.add_argument_group(f"{name} options ({tp.__name__})")
            add_dataclass_arguments(sub, tp, prefix=name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" {{{'|'.join(map(str, choices))}}}"
        rng = getattr(cls, "RANGES", {}).get(f.name)
        if rng is not None:
            help_text += f"; {rng}"
        help_text += f" (default: {default})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if typing.get_origin(tp) in (list, List):
            kwargs.update(nargs="+", metavar="V", action="extend")  # repeatable: --reward_fn A --reward_fn B
        elif tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=getattr(tp, "__name__", "V").upper())
        group.add_argument("--" + name, **kwargs)


def namespace_overrides(ns: argparse.Namespace, cls) -> Dict[str, Any]:
    """The options of `cls` that were given on the command line, as a nested dict."""
    names = set()

    def collect(c, prefix):
        for f in dataclasses.fields(c):
            tp, _ = _strip_optional(_hints(c)[f.name])
            if dataclasses.is_dataclass(tp):
                collect(tp, prefix + f.name + ".")
            else:
                names.add(prefix + f.name)
    collect(cls, "")
    return unflatten({k: v for k, v in vars(ns).items() if k in names})


def parse_config(cls: Type[T], argv: Optional[Sequence[str]] = None, *, base: Optional[Mapping] = None) -> T:
    """Parse `[--config FILE] [--key value ...]` into `cls`: defaults < `base` < file < command line."""
    parser = argparse.ArgumentParser(prog=cls.__name__)
    parser.add_argument("--config", default=None)
    add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(argv)
    values = dict(base or {})
    if ns.config:
        values = merge_dicts(values, load_config_file(ns.config))
    values = merge_dicts(values, namespace_overrides(ns, cls))
    return config_from_dict(cls, values)


# ----------------------------------------------------------------------------- DeepSpeed config

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
