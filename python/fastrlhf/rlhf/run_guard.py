"""What keeps one run from spoiling another in the same output dir.

- `OutputDirLock`: `<output_dir>/.fastrlhf.lock`, an exclusive `flock` held by rank 0 while a run
  is alive. The kernel drops a flock when its process dies, however it dies, so a lock file whose
  flock can be taken is stale (its run was killed): it is reported and taken over. The file records
  pid, host, start time and command, which is what the messages show. On a filesystem without
  flock, a lock of another live pid on this host, or of any pid on another host, is refused.
- `check_output_kind`: a run refuses an output dir that holds another kind of model (a reward
  model, a PPO output, ...) unless `overwrite_output_dir` is set. `RUN_FILE` records the kind
  and state of the run that last wrote the dir.
- `run_fingerprint` / `fingerprint_diff`: what defines a run (trainer, model and data identity,
  the options that change the math) is stored in every checkpoint; `--resume auto` refuses a
  checkpoint whose fingerprint differs, naming what differs.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import socket
import sys
from typing import Any, Dict, List, Optional

from ..errors import ConfigError
from ..options import in_fingerprint

LOCK_FILE = ".fastrlhf.lock"
RUN_FILE = "fastrlhf_run.json"

# ----------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe_holder(info: Dict[str, Any]) -> str:
    cmd = info.get("command") or "?"
    return (f"process {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}, "
            f"command `{cmd}`")


class OutputDirLock:
    """An exclusive lock on an output dir for the life of a run (see the module docstring)."""

    _held: Dict[str, "OutputDirLock"] = {}  # realpath -> lock held by this process

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: Optional[int] = None
        self.stale_note: Optional[str] = None

    def acquire(self, trainer: str) -> "OutputDirLock":
        key = os.path.realpath(self.path)
        previous = OutputDirLock._held.get(key)
        if previous is not None:  # an earlier run of this process that ended without releasing (an exception)
            previous.release()
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked is False:
                info = self._read(fd)
                os.close(fd)
                raise ConfigError(f"output_dir {self.output_dir} is in use by another fastrlhf run "
                                  f"({_describe_holder(info)}); wait for it to finish or use another --output_dir")
            # the file may have been removed and recreated between open and flock: lock the current one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise ConfigError(f"could not lock output_dir {self.output_dir} (its lock file keeps changing)")
        info = self._read(fd)
        if info.get("pid") is not None and (info.get("pid") != os.getpid() or info.get("host") != socket.gethostname()):
            if locked is None:  # no flock on this filesystem: judge by the recorded process
                if info.get("host") != socket.gethostname():
                    os.close(fd)
                    raise ConfigError(
                        f"output_dir {self.output_dir} is locked by {_describe_holder(info)}; a process on another "
                        f"machine cannot be checked from here: if that run has ended, delete {self.path}")
                if _pid_alive(int(info["pid"])):
                    os.close(fd)
                    raise ConfigError(f"output_dir {self.output_dir} is in use by another fastrlhf run "
                                      f"({_describe_holder(info)}); wait for it to finish or use another --output_dir")
            self.stale_note = (f"output_dir {self.output_dir}: cleared a stale lock of a run that is no longer "
                               f"running ({_describe_holder(info)}; it was killed or crashed)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "trainer": trainer,
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        OutputDirLock._held[key] = self
        _register_atexit()
        return self

    @staticmethod
    def _flock(fd: int) -> Optional[bool]:
        """True: locked; False: another process holds it; None: this filesystem has no flock."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise

    @staticmethod
    def _read(fd: int) -> Dict[str, Any]:
        try:
            text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
            info = json.loads(text) if text else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None
        OutputDirLock._held.pop(os.path.realpath(self.path), None)


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(lambda: [lock.release() for lock in list(OutputDirLock._held.values())])
        _atexit_registered = True


# ----------------------------------------------------------------------------- what a dir holds

KIND_NAMES = {"sft": "an SFT model (fastrlhf sft)", "rm": "a reward model (fastrlhf rm)",
              "ppo": "a PPO/GRPO/RLOO output (fastrlhf ppo)", "dpo": "a DPO policy (fastrlhf dpo)",
              "model": "a causal LM"}


def trainer_kind(cfg) -> str:
    """sft | rm | ppo | dpo, from the config class (other classes: their lower-cased name)."""
    name = type(cfg).__name__
    return {"SFTConfig": "sft", "RMConfig": "rm", "PPOConfig": "ppo", "DPOConfig": "dpo"}.get(name, name.lower())


def read_run_file(output_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(output_dir, RUN_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def output_kind(output_dir: str) -> Optional[str]:
    """The kind of model the dir holds: a trainer kind, 'model' (a causal LM of unknown origin) or None."""
    from ..models.reward import RewardModel
    recorded = read_run_file(output_dir).get("trainer")
    if recorded:
        return recorded
    if RewardModel.is_reward_model_dir(output_dir):
        return "rm"
    if os.path.isfile(os.path.join(output_dir, "actor", "config.json")):
        return "ppo"
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return "model"
    return None


def check_output_kind(output_dir: str, kind: str, overwrite: bool) -> None:
    found = output_kind(output_dir)
    if found is None or found == kind or overwrite or (found == "model" and kind in ("sft", "dpo")):
        return
    raise ConfigError(f"output_dir {output_dir} holds {KIND_NAMES.get(found, found)}; this {kind} run would "
                      f"overwrite it: use another --output_dir, or pass --overwrite_output_dir true to replace it")


def write_run_file(output_dir: str, kind: str, status: str, **extra: Any) -> None:
    from ..utils.logging import json_safe
    info = {"trainer": kind, "status": status, "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            **extra}
    tmp = os.path.join(output_dir, RUN_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(info), f, indent=1)
    os.replace(tmp, os.path.join(output_dir, RUN_FILE))


# ----------------------------------------------------------------------------- fingerprint

MODEL_FIELDS = ("model_name_or_path", "tokenizer", "reward_model", "critic_model", "ref_model")
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".pt")
_NOT_MODEL_FILES = {RUN_FILE, "eval_before_after.json", "trainer_state.json", "latest"}
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
            from ..data.default_task import default_data_path
            fp["data files (content)"] = [content_digest(default_data_path())]
    if getattr(cfg, "deepspeed_config", None):
        fp["deepspeed_config (content)"] = content_digest(cfg.deepspeed_config)
    return json.loads(json.dumps(fp, default=str))  # the form it has after a trip through trainer_state.json


def _short(value: Any, width: int = 80) -> str:
    """A value for a one-line message; long ones keep their start and end (file names)."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width // 3] + "..." + text[-(width - width // 3 - 3):]


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
        if saved.get(key, "<unset>") != current.get(key, "<unset>"):
            diffs.append(f"{key} {_short(saved.get(key, '<unset>'))} -> {_short(current.get(key, '<unset>'))}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
    return diffs
