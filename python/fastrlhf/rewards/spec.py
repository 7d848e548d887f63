"""`--reward_fn SPEC` (also `--env SPEC` and `--tools SPEC`, `agents.spec`): `package.module:name` or
`path/to/file.py:name`, resolved to the object. The user's module is imported only inside worker processes (`worker.py`): the config
checks the spec's form and that a named file exists (`check_spec`), then, before any model loads,
a worker imports it (`worker.check_reward_functions`: a missing module or function is a
RewardSpecError, an import that hangs or ends the process a RewardError)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Callable, Tuple

from ..errors import RewardSpecError


# what a malformed spec's message shows, per option
EXAMPLES = {"--reward_fn": "--reward_fn fastrlhf.rewards:math_answer_match or --reward_fn my_rewards.py:score",
            "--env": "--env my_env.py:GuessNumber or --env my_package.envs:GuessNumber",
            "--tools": "--tools fastrlhf.agents:calculator or --tools my_tools.py:search"}


def split_spec(spec: str, option: str = "--reward_fn", kind: str = "function") -> Tuple[str, str]:
    """('package.module' or '/abs/path/file.py', name); RewardSpecError when malformed."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise RewardSpecError(
            f"{option} {spec!r} is not 'package.module:{kind}' or 'path/to/file.py:{kind}'; e.g. "
            f"{EXAMPLES.get(option, '')}")
    if target.endswith(".py"):
        return os.path.abspath(os.path.expanduser(target)), name
    return target, name


def check_spec(spec: str, option: str = "--reward_fn", kind: str = "function") -> None:
    """The spec's form, and that a file it names exists; imports nothing (RewardSpecError)."""
    target, _ = split_spec(spec, option, kind)
    if target.endswith(".py") and not os.path.isfile(target):
        raise RewardSpecError(f"{option} {spec!r}: the file {target} does not exist")


def absolute_spec(spec: str) -> str:
    """The spec with a file path made absolute (workers may run elsewhere)."""
    target, name = str(spec).rpartition(":")[::2]
    if target.endswith(".py"):
        target = os.path.abspath(os.path.expanduser(target))
    return f"{target}:{name}"


def _load_file(path: str, spec: str, option: str):
    if not os.path.isfile(path):
        raise RewardSpecError(f"{option} {spec!r}: the file {path} does not exist")
    mod_name = "fastrlhf_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[mod_name]
        raise RewardSpecError(f"{option} {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def _load_module(name: str, spec: str, option: str):
    if os.getcwd() not in sys.path:   # `my_rewards:fn` finds my_rewards.py in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise RewardSpecError(f"{option} {spec!r}: no module named {e.name!r} (looked in the working "
                                  f"directory and on sys.path); for a file use path/to/file.py:name") from None
        raise RewardSpecError(f"{option} {spec!r}: importing {name} failed: {e}") from None
    except BaseException as e:
        raise RewardSpecError(f"{option} {spec!r}: importing {name} failed: {type(e).__name__}: {e}") from None


def load_object(spec: str, option: str = "--reward_fn", kind: str = "function"):
    """The callable `spec` names (a function, or a class when kind is "class"), importing its
    module or executing its file once; RewardSpecError naming the option when it cannot."""
    target, name = split_spec(spec, option, kind)
    module = _load_file(target, spec, option) if target.endswith(".py") else _load_module(target, spec, option)
    obj = getattr(module, name, None)
    if obj is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardSpecError(f"{option} {spec!r}: {target} has no {kind} {name!r}"
                              + (f"; it defines {', '.join(public[:12])}" if public else ""))
    if kind == "class" and not isinstance(obj, type):
        raise RewardSpecError(f"{option} {spec!r}: {name} in {target} is a {type(obj).__name__}, not a class")
    if not callable(obj):
        raise RewardSpecError(f"{option} {spec!r}: {name} in {target} is a {type(obj).__name__}, not a {kind}")
    return obj


def load_reward_fn(spec: str) -> Callable:
    """The reward function `spec` names."""
    return load_object(spec, "--reward_fn", "function")


def spec_name(spec: str) -> str:
    """A short name for logs: the function's name (with the module/file stem when needed)."""
    target, name = split_spec(spec)
    return name
