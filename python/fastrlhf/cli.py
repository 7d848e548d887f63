"""The `fastrlhf` command line.

    fastrlhf train [--steps 1 2 3] [--config run.yaml] [--model_name_or_path M] [--output_dir D] ...
    fastrlhf train --task arithmetic      (SFT then GRPO with an exact-answer reward function)
    fastrlhf train --task calculator      (the same with a calculator tool, multi-turn)
    fastrlhf sft   [--config sft.yaml] [--key value ...]
    fastrlhf rm    [--config rm.yaml]  [--key value ...]
    fastrlhf ppo   [--config ppo.yaml] [--key value ...]
    fastrlhf grpo | rloo | reinforce++ | reinforce++_baseline [...]   (= fastrlhf ppo --algo ...)
    fastrlhf dpo   [--config dpo.yaml] [--key value ...]
    fastrlhf chat  --model DIR              (fastrlhf.rlhf.chat)
    fastrlhf ops

Every option of a step's config is a `--key value` flag (nested: `--data.max_prompt_len 64`);
precedence is defaults < bundled-task profile (only when no model is given) < --config file <
command line. This module parses and dispatches; what a command's values become (configs, the
steps of `train`, a bundled task's settings and evaluation) is `fastrlhf.rlhf.pipeline`'s. Multi-process: `deepspeed --num_gpus N $(which fastrlhf) train ...` or
`torchrun --nproc_per_node N -m fastrlhf.cli train ...`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Dict, List, Optional, Sequence

from .config import TrainConfig
from .errors import USER_INPUT_ERRORS, SaveError, TrainingDiverged
from .ops.dispatch import BackendError
from .options import (add_dataclass_arguments, did_you_mean, load_config_file, namespace_overrides, option_names,
                      unflatten)
from .rlhf import pipeline
from .rlhf.configs import PPOConfig
from .rlhf.pipeline import STEP_NAMES
from .rlhf.registry import TRAINERS
from .tasks.registry import TASKS

TRAIN_EPILOG = """\
examples:
  fastrlhf train                                   # steps 1, 2 and 3 on the bundled tiny task
  fastrlhf train --steps 1 2 --output_dir runs/a   # SFT then reward model, into runs/a/step1_sft, runs/a/step2_rm
  fastrlhf train --model_name_or_path facebook/opt-350m --data.paths Dahoas/rm-static \\
      --zero_stage 2 --dtype bf16 --sft.learning_rate 2e-5 --rm.num_epochs 1
  fastrlhf train --config run.yaml                 # top-level keys apply to every step; sections sft:, rm:, ppo:
  fastrlhf train --task arithmetic                 # SFT, then GRPO with a reward function and no reward model;
                                                   # prints held-out pass@1 / pass@8 before and after RL
  fastrlhf train --task calculator                 # the same problems with a calculator tool: multi-turn GRPO
  fastrlhf train --steps 3 --model_name_or_path runs/sft --data.paths examples/guess_number/prompts.jsonl \
      --ppo.env examples/guess_number/guess_number.py:GuessNumber --ppo.max_turns 5   # an environment
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
    tasks = [f"'{t.name}' ({t.help})" for t in TASKS.values()]
    train.add_argument("--task", choices=tuple(TASKS), default="default",
                       help="bundled task when no model/data is named: " + ", ".join(tasks[:-1]) + " or " + tasks[-1])
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


def unknown_argument(extra: Sequence[str], known: Sequence[str]) -> CLIError:
    """The error for the first argument argparse did not know, with the closest known options."""
    tok = extra[0]
    if not tok.startswith("--"):
        return CLIError(f"unexpected argument {tok!r}; options look like --key value")
    key = tok[2:].partition("=")[0]
    return CLIError(f"unknown option --{key}" + (did_you_mean(key, known, "--") or "; see --help for the options"))


def _preset_flag(command: str, preset: Dict[str, Any], extra: Sequence[str]) -> Optional[CLIError]:
    """`fastrlhf grpo --algo ppo`: the command fixes --algo (it is no flag of it), so say which command runs
    the algorithm asked for, rather than "unknown option --algo"."""
    key, _, value = extra[0][2:].partition("=") if extra[0].startswith("--") else ("", "", "")
    if key not in preset:
        return None
    wanted = value or (extra[1] if len(extra) > 1 and not extra[1].startswith("--") else "...")
    return CLIError(f"`fastrlhf {command}` runs --{key} {preset[key]}, a fixed setting of the command; for --{key} "
                    f"{wanted}, run `fastrlhf ppo --{key} {wanted} ...`")


def cmd_trainer(args: argparse.Namespace, extra: List[str]) -> int:
    entry = TRAINERS[args.trainer]
    if extra:
        raise _preset_flag(args.trainer, entry.preset, extra) or unknown_argument(
            extra, [o for o in option_names(entry.config) if o not in entry.preset] + ["config"])
    cfg = pipeline.trainer_config(args.trainer, _file_values(args.config), namespace_overrides(args, entry.config))
    from .utils.logging import print_rank0
    with pipeline.cpu_numerics_pinned(not cfg.model_name_or_path):  # the bundled default task's model
        print_rank0("summary: " + pipeline.run_trainer(args.trainer, cfg))
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


def build_step_configs(args: argparse.Namespace, extra: Sequence[str]) -> Dict[int, Any]:
    """`fastrlhf train`'s parsed arguments (and the --config file) -> the config of every step
    (`rlhf.pipeline.build_step_configs`)."""
    file_values = _file_values(args.config)
    step_files = {name: file_values.pop(name, None) or {} for name in STEP_NAMES.values()}
    return pipeline.build_step_configs(
        steps=args.steps, rm_init=args.rm_init, task=getattr(args, "task", "default"), file_values=file_values,
        flags=namespace_overrides(args, TrainConfig), step_files=step_files, step_flags=_split_step_overrides(extra),
        config_file=args.config)


def cmd_train(args: argparse.Namespace, extra: List[str]) -> int:
    configs = build_step_configs(args, extra)
    pipeline.check_step_inputs(configs)
    named = namespace_overrides(args, TrainConfig).get("model_name_or_path") or \
        _file_values(args.config).get("model_name_or_path")
    with pipeline.cpu_numerics_pinned(args.task in pipeline.PINNED_TASKS and not named):
        summary = pipeline.run_steps(configs, args.task)
    from .utils.logging import print_rank0
    print_rank0("summary:\n  " + "\n  ".join(summary))
    return 0


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
