"""What defines a run: its fingerprint, stored in every checkpoint, so that `--resume auto`
continues only the run that made a checkpoint and names what differs otherwise.

The fingerprint holds the trainer kind, every option but those defined with
`option(..., fingerprint=False)` (where and how often to save, log, evaluate; how long to run;
how rewards are fetched), the content of the local models, data files and DeepSpeed config the
run reads, and the code of its reward functions, environment class and tools (the file that
defines each, as the worker that imported it found it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

from ..options import in_fingerprint

MODEL_FIELDS = ("model_name_or_path", "tokenizer", "reward_model", "critic_model", "ref_model")
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".pt")
# files a run writes beside a model (run_setup.RUN_FILE, checkpoint.TRAINER_STATE, ...): not the model
_NOT_MODEL_FILES = {"fastrlhf_run.json", "eval_before_after.json", "trainer_state.json", "latest",
                    "fastrlhf_saved_files.json"}
_WHOLE_FILE_LIMIT = 8 << 20   # files up to this size are hashed whole; larger ones by size + head + tail
_EDGE = 1 << 20


def _file_digest(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return f"{size}:{h.hexdigest()[:16]}"


def _dir_digest(path: str, model_files_only: bool) -> str:
    h = hashlib.sha256()
    n = 0
    for root, dirs, files in os.walk(path):
        if model_files_only:  # a model dir may also hold checkpoints, logs, other roles' subdirs
            dirs[:] = []
        dirs.sort()
        for name in sorted(files):
            if model_files_only and (not name.endswith(_MODEL_FILE_SUFFIXES) or name in _NOT_MODEL_FILES):
                continue
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}={_file_digest(full)};".encode())
            n += 1
    return f"{n} files:{h.hexdigest()[:16]}"


def content_digest(path: Optional[str], model: bool = False) -> Optional[str]:
    """A local file's or dir's content digest; None for hub names / unset."""
    if not path:
        return None
    if os.path.isfile(path):
        return _file_digest(path)
    if os.path.isdir(path):
        return _dir_digest(path, model_files_only=model)
    return None


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of the options that are part of a run's identity: every option but
    those defined with `fingerprint=False` (where and how often to save, log, evaluate; how long
    to run, since a run may be extended), nested dataclasses included."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not in_fingerprint(f):
            continue
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def run_fingerprint(cfg, kind: str) -> Dict[str, Any]:
    """{key: value} of everything that defines the run (JSON-able): the trainer, the options that
    change the math, and the content of local models, data files and the DeepSpeed config."""
    fp: Dict[str, Any] = {"trainer": kind}
    fp.update(_flatten(cfg))
    for name in MODEL_FIELDS:
        if getattr(cfg, name, None):
            fp[f"{name} (content)"] = content_digest(getattr(cfg, name), model=True)
    data = getattr(cfg, "data", None)
    if data is not None:
        if data.paths:
            fp["data files (content)"] = [content_digest(p) for p in data.paths]
        else:
            from ..tasks.default_task import default_data_path
            fp["data files (content)"] = [content_digest(default_data_path())]
    if getattr(cfg, "deepspeed_config", None):
        fp["deepspeed_config (content)"] = content_digest(cfg.deepspeed_config)
    if getattr(cfg, "reward_fn", None):  # the code that makes the rewards (read from the file a worker found)
        from ..rewards.worker import reward_source_files
        fp["reward_fn (code)"] = [content_digest(path) for path in reward_source_files(cfg.reward_fn,
                                                                                       cfg.reward_timeout)]
    if getattr(cfg, "env", None) or getattr(cfg, "tools", None):  # environment / tool code, likewise
        from ..agents.step3 import agent_source_files
        fp["env (code)" if cfg.env else "tools (code)"] = [content_digest(p) for p in agent_source_files(cfg)]
    return json.loads(json.dumps(fp, default=str))  # the form it has after a trip through trainer_state.json


def _short(value: Any, width: int = 80) -> str:
    """A value for a one-line message; long ones keep their start and end (file names)."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width // 3] + "..." + text[-(width - width // 3 - 3):]


# "<option> (code)" keys: the option naming the code, and what to call it in a message
_CODE_KEYS = {"reward_fn (code)": ("reward_fn", "reward function"), "env (code)": ("env", "environment"),
              "tools (code)": ("tools", "tool")}


def fingerprint_diff(saved: Optional[Dict[str, Any]], current: Dict[str, Any], limit: int = 3) -> List[str]:
    """What differs between two fingerprints, one short phrase per key (at most `limit`, then a count)."""
    if saved is None:
        return []
    diffs = []
    for key in sorted(set(saved) | set(current), key=lambda k: (k != "trainer", k)):
        if key.endswith("(content)") and key[:-len(" (content)")] in MODEL_FIELDS + ("deepspeed_config",):
            base = key[:-len(" (content)")]
            if saved.get(base) != current.get(base):
                continue  # the path itself differs: reported once, under its own key
            if saved.get(key) != current.get(key):
                diffs.append(f"the content of {base} {current.get(base)} changed")
            continue
        if key == "data files (content)" and saved.get("data.paths") == current.get("data.paths"):
            if saved.get(key) != current.get(key):
                diffs.append("the content of the data files changed")
            continue
        if key == "data files (content)":
            continue
        if key in _CODE_KEYS:
            option, what = _CODE_KEYS[key]
            if saved.get(option) == current.get(option):
                specs = current.get(option) or []
                specs = [specs] if isinstance(specs, str) else specs
                changed = [spec for spec, a, b in zip(specs, saved.get(key) or [], current.get(key) or []) if a != b]
                if changed or saved.get(key) != current.get(key):
                    diffs.append(f"the code of the {what} {', '.join(changed) or '(one of them)'} changed")
            continue  # else the specs differ: reported once, under their own key
        if saved.get(key, "<unset>") != current.get(key, "<unset>"):
            diffs.append(f"{key} {_short(saved.get(key, '<unset>'))} -> {_short(current.get(key, '<unset>'))}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
    return diffs
