"""`--reward_fn SPEC`: `package.module:function` or `path/to/file.py:function`, resolved to the
callable. The user's module is imported only inside worker processes (`worker.py`): the config
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


def split_spec(spec: str) -> Tuple[str, str]:
    """('package.module' or '/abs/path/file.py', 'function'); RewardSpecError when malformed."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise RewardSpecError(
            f"--reward_fn {spec!r} is not 'package.module:function' or 'path/to/file.py:function'; e.g. "
            f"--reward_fn fastrlhf.rewards:math_answer_match or --reward_fn my_rewards.py:score")
    if target.endswith(".py"):
        return os.path.abspath(os.path.expanduser(target)), name
    return target, name


def check_spec(spec: str) -> None:
    """The spec's form, and that a file it names exists; imports nothing (RewardSpecError)."""
    target, _ = split_spec(spec)
    if target.endswith(".py") and not os.path.isfile(target):
        raise RewardSpecError(f"--reward_fn {spec!r}: the file {target} does not exist")


def absolute_spec(spec: str) -> str:
    """The spec with a file path made absolute (workers may run elsewhere)."""
    target, name = split_spec(spec)
    return f"{target}:{name}"


def _load_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise RewardSpecError(f"--reward_fn {spec!r}: the file {path} does not exist")
    mod_name = "fastrlhf_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[mod_name]
        raise RewardSpecError(f"--reward_fn {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def _load_module(name: str, spec: str):
    if os.getcwd() not in sys.path:   # `my_rewards:fn` finds my_rewards.py in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise RewardSpecError(f"--reward_fn {spec!r}: no module named {e.name!r} (looked in the working "
                                  f"directory and on sys.path); for a file use path/to/file.py:function") from None
        raise RewardSpecError(f"--reward_fn {spec!r}: importing {name} failed: {e}") from None
    except BaseException as e:
        raise RewardSpecError(f"--reward_fn {spec!r}: importing {name} failed: {type(e).__name__}: {e}") from None


def load_reward_fn(spec: str) -> Callable:
    """The callable `spec` names (importing its module or executing its file once)."""
    target, name = split_spec(spec)
    module = _load_file(target, spec) if target.endswith(".py") else _load_module(target, spec)
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardSpecError(f"--reward_fn {spec!r}: {target} has no function {name!r}"
                              + (f"; it defines {', '.join(public[:12])}" if public else ""))
    if not callable(fn):
        raise RewardSpecError(f"--reward_fn {spec!r}: {name} in {target} is a {type(fn).__name__}, not a function")
    return fn


def spec_name(spec: str) -> str:
    """A short name for logs: the function's name (with the module/file stem when needed)."""
    target, name = split_spec(spec)
    return name
