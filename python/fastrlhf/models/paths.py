"""Where a model comes from, checked before anything loads: the one check every model path gets
(`check_model_path`), what a local dir holds (`model_dir_kind`: a policy, a reward model, a run
with model subdirs, ...), hub names (reachable, or cached when offline) and the bundled default
(`resolve_model_path(None)`). Pure file-system and hub-metadata checks: no torch, no weights.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from ..errors import ModelPathError


def default_model_dir() -> str:
    try:
        from ..tasks.default_task import default_model_dir as task_default_dir
    except ImportError as e:
        raise RuntimeError("the bundled default model (fastrlhf.tasks.default_task) is not available; "
                           "pass --model_name_or_path") from e
    return str(task_default_dir())


def resolve_model_path(path: Optional[str]) -> str:
    return str(path) if path else default_model_dir()


# what each expected kind is, in words, for the messages
MODEL_KINDS = {
    "policy": "a causal LM (a base model, or the output of `fastrlhf sft`)",
    "reward": "a reward model (the output of `fastrlhf rm`: config.json + value_head.safetensors)",
    "any": "a model dir (config.json + weights)",
    "tokenizer": "a tokenizer (a model dir with tokenizer files, or a tokenizer dir)",
}
REWARD_HEAD_FILE = "value_head.safetensors"  # models/reward.py's HEAD_FILE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model")


def model_dir_kind(path: str) -> str:
    """What a local dir holds: 'reward' (a fastrlhf reward model), 'policy' (an HF causal LM or a
    PEFT adapter), 'run' (no model at its root, but model subdirs), 'empty' or 'other'."""
    if os.path.isfile(os.path.join(path, REWARD_HEAD_FILE)):
        return "reward"
    if os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "policy"
    if model_subdirs(path):
        return "run"
    return "empty" if not os.listdir(path) else "other"


def model_subdirs(path: str) -> Dict[str, str]:
    """{subdir name: its kind} of the immediate subdirs of `path` that hold a model
    (a run's actor/, critic/, checkpoint-<step>/, a pipeline's step1_sft/ ...)."""
    found = {}
    try:
        names = sorted(os.listdir(path), key=_natural_key)
    except OSError:
        return found
    for name in names:
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and not name.endswith(".partial"):
            if os.path.isfile(os.path.join(sub, REWARD_HEAD_FILE)):
                found[name] = "reward"
            elif os.path.isfile(os.path.join(sub, "config.json")) or os.path.isfile(
                    os.path.join(sub, "adapter_config.json")):
                found[name] = "policy"
    return found


def _natural_key(name: str):
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _has_tokenizer_files(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json")) or any(
        os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def _hub_offline() -> bool:
    truthy = ("1", "on", "yes", "true")
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _is_hub_name(path: str) -> bool:
    """Could `path` be a hub repo id ('gpt2', 'org/name')? Paths like './x', '/a/b', 'a/b/c' cannot,
    nor 'runs/x' when there is a local dir runs/ (a typo in a local path, not a hub name)."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return False
    if "/" in path and os.path.isdir(path.split("/")[0]):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(path)
    except ImportError:
        return True
    except Exception:  # HFValidationError
        return False
    return True


def _check_hub_name(path: str, what: str) -> None:
    """A hub name must be in the local HF cache when offline, and reachable otherwise."""
    from huggingface_hub import try_to_load_from_cache
    cached = any(isinstance(try_to_load_from_cache(path, f), str) for f in ("config.json", "adapter_config.json"))
    if cached:
        return
    if _hub_offline():
        raise ModelPathError(
            f"{what}{path!r} is not a local directory, and as a hub model it is not in the local "
            f"HF cache while the hub is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). Fix: check the path, "
            f"or download the model where there is network (`hf download {path}`) and copy the cache", path=path)
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(path, "config.json")
    except Exception as e:  # network failure, unknown repo, gated repo, adapter-only repo
        name = type(e).__name__
        if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            return  # the repo exists (e.g. a PEFT adapter without config.json); loading takes it from here
        if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            why = f"the hub has no model {path!r} you can access ({name})"
        else:
            why = f"the hub could not be reached ({name})"
        raise ModelPathError(f"{what}{path!r} is not a local directory, and {why}. Fix: check the "
                             f"path or the model name, your network, or set HF_HUB_OFFLINE=1 to use only the "
                             f"local HF cache", path=path) from None


def check_model_path(path: Optional[str], expect: str = "any", *, option: Optional[str] = None,
                     tokenizer: bool = False) -> None:
    """The one check every model path gets before anything loads from it; raises ModelPathError
    (a ConfigError) saying what was expected and what was found.

    `expect`: 'policy' (a causal LM: an SFT model, an actor, a reference), 'reward' (a step-2
    reward model dir), 'any' (a backbone to start from) or 'tokenizer' (a dir with tokenizer files,
    or a model dir that has them). `option` names the flag in messages. `tokenizer=True` also
    requires tokenizer files in a local model dir (a PEFT adapter dir borrows its base model's).
    None (the bundled default) always passes, except as a reward model."""
    if expect not in MODEL_KINDS:
        raise ValueError(f"expect must be one of {', '.join(MODEL_KINDS)}, got {expect!r}")
    if expect == "tokenizer":
        if path and os.path.isdir(path) and _has_tokenizer_files(path):
            return
        tokenizer = True
    what = f"{option} " if option else ""
    expected = MODEL_KINDS[expect]
    if not path:
        if expect == "reward":
            raise ModelPathError(f"{what}is not set; it must be {expected}", path=path)
        return
    path = str(path)
    if not os.path.exists(path):
        if expect == "reward":
            raise ModelPathError(f"{what}{path!r}: no such directory; it must be {expected}", path=path)
        if _is_hub_name(path):
            _check_hub_name(path, what)
            return
        parent = os.path.dirname(os.path.normpath(path)) or "."
        where = "" if os.path.isdir(parent) else f" (nor does {parent}/)"
        raise ModelPathError(f"{what}{path!r}: no such directory{where}; it must be {expected}. Fix: check the "
                             f"path (relative paths are taken from {os.getcwd()})", path=path)
    if not os.path.isdir(path):
        raise ModelPathError(f"{what}{path!r} is a file; it must be {expected}, a directory", path=path)
    kind = model_dir_kind(path)
    if kind == "empty":
        raise ModelPathError(f"{what}{path!r} is an empty directory; it must be {expected}", path=path)
    if kind == "other":
        names = sorted(os.listdir(path))
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ModelPathError(f"{what}{path!r} holds no model (no config.json; it has {shown}); it must be "
                             f"{expected}", path=path)
    if kind == "run":
        subdirs = model_subdirs(path)
        listed = ", ".join(f"{name}/" + (" (reward model)" if k == "reward" else "") for name, k in subdirs.items())
        # a run's critic/ has the reward-model format but is a value function, never the reward model
        fits = [n for n, k in subdirs.items() if expect == "any" or (k == expect and not n.startswith("critic"))]
        pick = "actor" if "actor" in fits and expect != "reward" else (fits[0] if fits else None)
        fix = f" Fix: pass {os.path.join(path, pick)}" if pick else ""
        raise ModelPathError(f"{what}{path!r} holds a training run, not a model: its model subdirs are {listed}; "
                             f"it must be {expected}.{fix}", path=path)
    if expect == "reward" and kind != "reward":
        raise ModelPathError(f"{what}{path!r} is a causal LM (policy), not a reward model: it has no "
                             f"{REWARD_HEAD_FILE}, so its scores would come from a random value head; it must be "
                             f"{expected}", path=path)
    if expect == "policy" and kind == "reward":
        raise ModelPathError(f"{what}{path!r} is a reward model ({REWARD_HEAD_FILE}), not a causal LM: its backbone "
                             f"has no trained LM head; it must be {expected}", path=path)
    if tokenizer and not _has_tokenizer_files(path):
        raise ModelPathError(f"{what}{path!r} has a model but no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                             f"...). Fix: pass --tokenizer NAME_OR_DIR, or save the tokenizer into that dir", path=path)
