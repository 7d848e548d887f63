"""The `fastrlhf` command line.

    fastrlhf train [--steps 1 2 3] [--config run.yaml] [--model_name_or_path M] [--output_dir D] ...
    fastrlhf train --task arithmetic      (SFT then GRPO with an exact-answer reward function)
    fastrlhf sft   [--config sft.yaml] [--key value ...]
    fastrlhf rm    [--config rm.yaml]  [--key value ...]
    fastrlhf ppo   [--config ppo.yaml] [--key value ...]
    fastrlhf grpo | rloo | reinforce++ | reinforce++_baseline [...]   (= fastrlhf ppo --algo ...)
    fastrlhf dpo   [--config dpo.yaml] [--key value ...]
    fastrlhf chat  --model DIR              (fastrlhf.rlhf.chat)
    fastrlhf ops

Every option of a step's config is a `--key value` flag (nested: `--data.max_prompt_len 64`);
precedence is defaults < bundled-task profile (only when no model is given) < --config file <
command line. Multi-process: `deepspeed --num_gpus N $(which fastrlhf) train ...` or
`torchrun --nproc_per_node N -m fastrlhf.cli train ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .config import TrainConfig
from .data.spec import PIPELINE_SPLIT_RATIOS
from .errors import USER_INPUT_ERRORS, ConfigError, SaveError, TrainingDiverged
from .ops.dispatch import BackendError
from .options import (add_dataclass_arguments, config_from_dict, did_you_mean, load_config_file, merge_dicts,
                      namespace_overrides, option_names, unflatten)
from .rlhf.configs import DEFAULT_TASK_PROFILES, PPOConfig
from .rlhf.registry import TRAINERS

STEP_NAMES = {1: "sft", 2: "rm", 3: "ppo"}
STEP_DIRS = {1: "step1_sft", 2: "step2_rm", 3: "step3_ppo"}

TRAIN_EPILOG = """\
examples:
  fastrlhf train                                   # steps 1, 2 and 3 on the bundled tiny task
  fastrlhf train --steps 1 2 --output_dir runs/a   # SFT then reward model, into runs/a/step1_sft, runs/a/step2_rm
  fastrlhf train --model_name_or_path facebook/opt-350m --data.paths Dahoas/rm-static \\
      --zero_stage 2 --dtype bf16 --sft.learning_rate 2e-5 --rm.num_epochs 1
  fastrlhf train --config run.yaml                 # top-level keys apply to every step; sections sft:, rm:, ppo:
  fastrlhf train --task arithmetic                 # SFT, then GRPO with a reward function and no reward model;
                                                   # prints held-out pass@1 / pass@8 before and after RL
  fastrlhf train --steps 1 3 --ppo.algo grpo --ppo.group_size 4 --data.paths math.jsonl \
      --ppo.reward_fn fastrlhf.rewards:math_answer_match --ppo.reward_fn my_rewards.py:brevity \
      --ppo.reward_weights 1.0 0.2                 # reward functions instead of a reward model (no step 2)

Options shared by all steps are listed below; any step-only option is given as --sft.KEY, --rm.KEY or
--ppo.KEY (see `fastrlhf sft --help`, `fastrlhf rm --help`, `fastrlhf ppo --help` for the keys).
"""


REWARD_EPILOG = """\
rewards (any weighted mix; a sample that a source scores None is left out of the loss):
  --reward_model DIR        the step-2 reward model (optional when a function or server is given)
  --reward_fn SPEC          repeatable; package.module:function or path/to/file.py:function, called in a worker
                            process as fn(prompts, completions, **columns) -> list[float | None], where columns are
                            the dataset's other columns (e.g. answer); built-ins: fastrlhf.rewards:math_answer_match,
                            format_reward, length_penalty, arithmetic_reward
  --reward_url URL          repeatable; POST {"prompts", "completions", ...columns} -> {"rewards": [...]}
  --reward_weights W ...    one per source: reward model first, then each --reward_fn, then each --reward_url
  --reward_timeout S        per batch (function) or request (server); servers are retried with backoff

example:
  fastrlhf ppo --algo grpo --group_size 8 --model_name_or_path runs/sft --data.paths gsm8k.jsonl \\
      --reward_fn fastrlhf.rewards:math_answer_match --reward_fn my_rewards.py:brevity --reward_weights 1 0.1
"""


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _profile(name: str, model_given: bool) -> Dict[str, Any]:
    """The bundled-task settings of a trainer, used only when no model is named."""
    return {} if model_given else dict(DEFAULT_TASK_PROFILES.get(name, {}))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (command line wins)")
    # the deepspeed launcher passes --local_rank; the process group reads LOCAL_RANK from the env
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=40, width=110)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrlhf", formatter_class=_formatter, allow_abbrev=False,
        description="fastrlhf: RLHF (SFT -> reward model -> PPO) on DeepSpeed with a fast hybrid generation "
                    "engine.\nWith no model arguments everything runs on a bundled tiny task, on a CPU in minutes.",
        epilog="run `fastrlhf COMMAND --help` for the options of a command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", allow_abbrev=False, help="run several steps, each feeding the next",
                           formatter_class=_formatter,
                           usage="fastrlhf train [--steps N [N ...]] [--rm_init {base,sft}] [--config FILE] "
                                 "[--KEY VALUE ...] [--sft.KEY VALUE ...] [--rm.KEY VALUE ...] [--ppo.KEY VALUE ...]",
                           description="Run the listed steps in order:\n"
                                       "  step 1 SFT writes <output_dir>/step1_sft;\n"
                                       "  step 2 trains the reward model into <output_dir>/step2_rm, initialised from\n"
                                       "         the base model (or from the SFT model with --rm_init sft);\n"
                                       "  step 3 PPO trains the SFT model against that reward model.",
                           epilog=TRAIN_EPILOG)
    train.add_argument("--steps", type=int, nargs="+", default=None, choices=(1, 2, 3), metavar="N",
                       help="steps to run, from 1 2 3 (default: all three)")
    train.add_argument("--rm_init", choices=("base", "sft"), default="base",
                       help="initialise the reward model from the base model (default, as DeepSpeed-Chat) "
                            "or from the step-1 output")
    train.add_argument("--task", choices=("default", "arithmetic"), default="default",
                       help="bundled task when no model/data is named: 'default' (tone, steps 1 2 3) or "
                            "'arithmetic' (word problems: SFT then GRPO with the exact-answer reward function, no "
                            "reward model; prints held-out pass@1 and pass@k before and after RL)")
    _add_common(train)
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    for name, entry in TRAINERS.items():
        p = sub.add_parser(name, allow_abbrev=False, help=entry.help, formatter_class=_formatter,
                           description=(entry.help + ".\n\n" if entry.preset else "") + entry.config.__doc__,
                           epilog=REWARD_EPILOG if entry.config is PPOConfig else None,
                           usage=f"fastrlhf {name} [--config FILE] [--KEY VALUE ...] [--data.KEY VALUE ...]")
        _add_common(p)
        add_dataclass_arguments(p, entry.config, skip=("algo",) if "algo" in entry.preset else ())
        for action in p._actions:  # the command's own defaults in its --help
            if action.dest in entry.preset and action.help:
                action.help = action.help.rsplit(" (default: ", 1)[0] + f" (default: {entry.preset[action.dest]})"
        p.set_defaults(func=cmd_trainer, trainer=name)

    chat = sub.add_parser("chat", add_help=False,
                          help="talk to a trained model: multi-turn on the hybrid engine (--prompt: one shot)")
    chat.add_argument("-h", "--help", action="store_true")
    chat.set_defaults(func=cmd_chat)

    ops = sub.add_parser("ops", help="show the kernel backends and the CUDA extension status",
                         formatter_class=_formatter)
    ops.set_defaults(func=cmd_ops)
    return parser


# ----------------------------------------------------------------------------- commands

def _file_values(path: Optional[str]) -> Dict[str, Any]:
    return load_config_file(path) if path else {}


def _layered_values(name: str, file_values: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The trainer's bundled-task profile (only when no model is named) < config file < command line."""
    values = merge_dicts(file_values, overrides)
    return merge_dicts(_profile(name, bool(values.get("model_name_or_path"))), values)


def unknown_argument(extra: Sequence[str], known: Sequence[str]) -> CLIError:
    """The error for the first argument argparse did not know, with the closest known options."""
    tok = extra[0]
    if not tok.startswith("--"):
        return CLIError(f"unexpected argument {tok!r}; options look like --key value")
    key = tok[2:].partition("=")[0]
    return CLIError(f"unknown option --{key}" + (did_you_mean(key, known, "--") or "; see --help for the options"))


def cmd_trainer(args: argparse.Namespace, extra: List[str]) -> int:
    entry = TRAINERS[args.trainer]
    if extra:
        raise unknown_argument(extra, option_names(entry.config) + ["config"])
    values = _layered_values(entry.profile or args.trainer, _file_values(args.config),
                             namespace_overrides(args, entry.config))
    for key, value in entry.preset.items():
        if key == "algo" and values.get(key, value) != value:
            raise CLIError(f"`fastrlhf {args.trainer}` runs --algo {value}, not {values[key]}; "
                           f"use `fastrlhf ppo --algo {values[key]}`")
    cfg = config_from_dict(entry.config, merge_dicts(entry.preset, values))
    from .utils.logging import print_rank0
    print_rank0("summary: " + entry.summary(entry.train(cfg)))
    return 0


def _split_step_overrides(extra: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """`--sft.learning_rate 1e-5 --rm.data.max_samples 100` -> {"sft": {...}, "rm": {...}} (strings)."""
    out: Dict[str, Dict[str, Any]] = {"sft": {}, "rm": {}, "ppo": {}}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise CLIError(f"unexpected argument {tok!r}; options look like --key value")
        key, _, value = tok[2:].partition("=")
        section, _, rest = key.partition(".")
        if section not in out or not rest:
            raise _unknown_train_option(key)
        values: List[str] = [value] if value else []
        while not value and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            values.append(extra[i + 1])
            i += 1
        i += 1
        value = values[0] if len(values) == 1 else (values or "true")
        if rest in out[section] and rest.split(".")[-1].startswith("reward_"):  # repeatable: --ppo.reward_fn A ...
            before = out[section][rest]
            value = (before if isinstance(before, list) else [before]) + (values or [value])
        out[section][rest] = value
    return {k: unflatten(v) for k, v in out.items()}


def _unknown_train_option(key: str) -> CLIError:
    shared = set(option_names(TrainConfig)) | {"steps", "rm_init", "config"}
    for step, name in STEP_NAMES.items():
        if key in option_names(TRAINERS[name].config):
            return CLIError(f"--{key} is an option of step {step} ({name}) only: pass it as --{name}.{key}")
    step_only = [f"{name}.{o}" for name in STEP_NAMES.values() for o in option_names(TRAINERS[name].config)
                 if o not in shared]
    hint = did_you_mean(key, sorted(shared) + step_only, "--")
    return CLIError(f"unknown option --{key}" + (hint or "; shared options are listed by `fastrlhf train --help`, "
                                                 "step-only ones are given as --sft.KEY, --rm.KEY or --ppo.KEY"))


def _fields_of(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def _task_defaults(task: str) -> tuple:
    """(values for every step, per-step profiles, default steps) of a bundled task."""
    if task != "arithmetic":
        return {}, DEFAULT_TASK_PROFILES, [1, 2, 3]
    from .data import arithmetic_task as at
    from .rlhf.configs import ARITHMETIC_TASK_PROFILES
    common = {"model_name_or_path": at.arithmetic_model_dir(),
              "data": {"paths": [at.arithmetic_data_path()], "split_ratios": "5,0,5", "max_prompt_len": 48,
                       "max_answer_len": 16}}
    return common, ARITHMETIC_TASK_PROFILES, [1, 3]


def build_step_configs(args: argparse.Namespace, extra: Sequence[str]) -> Dict[int, Any]:
    """The config of every requested step, wired so each step feeds the next."""
    file_values = _file_values(args.config)
    step_sections = {name: file_values.pop(name, None) or {} for name in ("sft", "rm", "ppo")}
    task = getattr(args, "task", "default")
    task_common, profiles, task_steps = _task_defaults(task)
    if task != "default" and 2 in (args.steps or []):
        raise CLIError(f"the {task} task has no reward-model step: its reward is a function; use --steps 1 3")
    common = merge_dicts(task_common, merge_dicts(file_values, namespace_overrides(args, TrainConfig)))
    unknown = set(common) - _fields_of(TrainConfig)
    if unknown:
        raise CLIError(f"unknown config key(s) {sorted(unknown)} at the top level of {args.config}; "
                       f"step-only keys go under sft:, rm: or ppo:")
    cli_steps = _split_step_overrides(extra)
    root = common.pop("output_dir", "output")
    base_model = common.get("model_name_or_path")
    task_model = task != "default" and base_model == task_common.get("model_name_or_path")
    steps = sorted(set(args.steps or task_steps))
    configs: Dict[int, Any] = {}
    for step in steps:
        name = STEP_NAMES[step]
        cls = TRAINERS[name].config
        fields = _fields_of(cls)
        values = {k: v for k, v in common.items() if k in fields}
        values["output_dir"] = os.path.join(root, STEP_DIRS[step])
        if step == 2 and args.rm_init == "sft":
            values["model_name_or_path"] = configs[1].output_dir if 1 in configs else os.path.join(root, STEP_DIRS[1])
        if step == 3:
            values["model_name_or_path"] = os.path.join(root, STEP_DIRS[1]) if 1 in steps or not base_model \
                or task_model else base_model
            given = merge_dicts(step_sections[name], cli_steps[name])
            # the step-2 model is the reward when step 2 runs now, or when no function/server is named
            if 2 in steps or not (given.get("reward_fn") or given.get("reward_url") or task != "default"):
                values["reward_model"] = os.path.join(root, STEP_DIRS[2])
        values = merge_dicts(values, step_sections[name])
        values = merge_dicts(values, cli_steps[name])
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


def cmd_train(args: argparse.Namespace, extra: List[str]) -> int:
    configs = build_step_configs(args, extra)
    check_step_inputs(configs)
    from .utils.logging import print_rank0
    summary = []
    t_start = time.time()
    accuracy = {}
    for step, cfg in configs.items():
        t0 = time.time()
        entry = TRAINERS[STEP_NAMES[step]]
        if step == 3 and args.task == "arithmetic":
            accuracy["before"] = _task_accuracy(cfg, cfg.model_name_or_path)
        r = entry.train(cfg)
        summary.append(entry.summary(r))
        del r  # free the engines before the next step
        summary[-1] += f" ({time.time() - t0:.0f}s, saved to {cfg.output_dir})"
        _release_memory()
        if step == 3 and args.task == "arithmetic":
            accuracy["after"] = _task_accuracy(cfg, os.path.join(cfg.output_dir, "actor"))
            summary.append(_accuracy_line(accuracy))
    print_rank0("summary:\n  " + "\n  ".join(summary) + f"\n  total {time.time() - t_start:.0f}s")
    return 0


ARITHMETIC_EVAL = {"prompts": 150, "k": 8}


def _task_accuracy(cfg, model_dir: str) -> Dict[str, float]:
    """Held-out pass@1 / pass@k of the arithmetic task (step-3 held-out prompts, k samples each)."""
    from .data import arithmetic_task as at
    from .models.loading import load_tokenizer
    from .utils.logging import print_rank0
    tok = load_tokenizer(model_dir, padding_side="left")
    items = at.heldout_items(tok, cfg.data, ARITHMETIC_EVAL["prompts"])
    res = at.evaluate_pass_at_k(model_dir, items, ARITHMETIC_EVAL["k"], temperature=cfg.temperature,
                                max_new_tokens=cfg.max_new_tokens or cfg.data.max_answer_len, seed=cfg.seed,
                                tokenizer=tok)
    print_rank0(f"[arithmetic] {model_dir}: held-out pass@1 {res['pass@1']:.3f}, pass@{ARITHMETIC_EVAL['k']} "
                f"{res['pass@' + str(ARITHMETIC_EVAL['k'])]:.3f}, greedy {res['greedy']:.3f} "
                f"({int(res['prompts'])} prompts)")
    return res


def _accuracy_line(acc: Dict[str, Dict[str, float]]) -> str:
    k = ARITHMETIC_EVAL["k"]
    b, a = acc["before"], acc["after"]
    return (f"arithmetic held-out accuracy ({int(a['prompts'])} prompts, {k} samples each, temperature as in RL): "
            f"pass@1 {b['pass@1']:.3f} -> {a['pass@1']:.3f}, pass@{k} {b[f'pass@{k}']:.3f} -> {a[f'pass@{k}']:.3f}, "
            f"greedy {b['greedy']:.3f} -> {a['greedy']:.3f}")


def _release_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def cmd_chat(args: argparse.Namespace, extra: List[str]) -> int:
    from .rlhf.chat import main as chat_main
    return chat_main(list(extra) + (["--help"] if args.help else []))


def cmd_ops(args: argparse.Namespace, extra: List[str]) -> int:
    if extra:
        raise CLIError(f"unrecognized arguments: {' '.join(extra)}")
    import torch
    from . import ops
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"device: {device}; selected backend setting: {ops.get_backend()}")
    for name in ops.BACKENDS:
        if name == "auto":
            continue
        ok, why = ops.backend_status(name, device)
        print(f"  {name:7s} {'available' if ok else 'not available'}{'' if ok or not why else ': ' + why}")
    from .ops import dispatch
    chosen = ", ".join(f"{op} -> {dispatch.resolve(op, device)[0]}" for op in ops.OPS)
    print(f"each op runs on ({ops.get_backend()}, {device.type}): {chosen}")
    for name in ("triton", "cuda"):
        try:
            fallbacks = importlib.import_module(f"fastrlhf.ops.{name}_backend").FALLBACK_OPS
        except ImportError:
            continue
        print(f"  {name} leaves to the next backend: {', '.join(fallbacks) or 'no op'}")
        handed_on = getattr(importlib.import_module(f"fastrlhf.ops.{name}_backend"), "ARGUMENTS_HANDED_ON", {})
        for op, arguments in handed_on.items():
            print(f"  {name} hands {op} calls with {' / '.join(arguments)} to triton (else the reference)")
    print("backward (calls that need gradients):")
    for name in ("triton", "cuda"):
        try:
            backward_of = importlib.import_module(f"fastrlhf.ops.{name}_backend").backward_of
        except (ImportError, AttributeError):
            continue
        by_route: dict = {}
        for op in ops.OPS:
            by_route.setdefault(backward_of(op, device), []).append(op)
        print(f"  {name}:")
        for route, names in by_route.items():
            print(f"    {', '.join(names)}: {route}")
    print("  torch: PyTorch autograd through the reference, every op")
    try:
        from .ops import cuda_build
    except ImportError:
        print("CUDA extension: build module not installed")
    else:
        print(cuda_build.status_report())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from .utils.logging import get_logger
    get_logger()  # so that fastrlhf.data's lines (what data each step uses) are printed
    try:
        from .ops.dispatch import get_backend
        get_backend()  # a bad FASTRLHF_BACKEND stops here, not deep inside a run
        return args.func(args, extra) or 0
    except (CLIError, BackendError, *USER_INPUT_ERRORS) as e:
        parser.exit(2, f"fastrlhf {args.command}: error: {e}\n")
    except TrainingDiverged as e:  # the message names the step, the quantity and the fix
        parser.exit(1, f"fastrlhf {args.command}: stopped: {e}\n")
    except SaveError as e:
        parser.exit(1, f"fastrlhf {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
