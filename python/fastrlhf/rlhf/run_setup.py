"""Run setup and the guard that keeps one run from spoiling another in the same output dir.

- `setup_run(cfg) -> RunContext`: validate, join the process group, CPU threads, seeds, the
  DeepSpeed config (`ds_engine.build_ds_config`), the output dir (locked, checked, its config
  saved), the metrics logger, and which checkpoint to resume (`check_resume`), before anything
  loads.
- `OutputDirLock`: `<output_dir>/.fastrlhf.lock`, an exclusive `flock` held by rank 0 while a run
  is alive. The kernel drops a flock when its process dies, however it dies, so a lock file whose
  flock can be taken is stale (its run was killed): it is reported and taken over. The file records
  pid, host, start time and command, which is what the messages show. On a filesystem without
  flock, a lock of another live pid on this host, or of any pid on another host, is refused.
- `check_output_owner`: a non-empty output dir that fastrlhf did not write is refused unless
  `overwrite_output_dir` is set; `check_output_kind`: so is one that holds another kind of model (a
  reward model, a PPO output, ...). `RUN_FILE` records the kind and state of the run that last
  wrote the dir (written when a run starts in a dir that has none).
- `check_resume`: `--resume auto` refuses a checkpoint whose fingerprint (`fingerprint.py`)
  differs, naming what differs.
"""
from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import random
import socket
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..options import config_to_dict, save_config
from ..utils.distributed import all_ranks_true, barrier, get_rank, get_world_size, init_distributed, is_rank0
from ..utils.logging import MetricsLogger, print_rank0, quiet_libraries
from . import checkpoint as ckpt_lib
from .ds_engine import build_ds_config, ds_precision, full_numel, zero_stage
from .fingerprint import fingerprint_diff, run_fingerprint
from .model_files import MODEL_MANIFEST

LOCK_FILE = ".fastrlhf.lock"
RUN_FILE = "fastrlhf_run.json"
STARTED = "started"  # RUN_FILE's status until the run's first save


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
    info = read_run_file(output_dir)
    if info.get("trainer") and info.get("status") != STARTED:  # a run that saved nothing wrote no model
        return info["trainer"]
    if RewardModel.is_reward_model_dir(output_dir):
        return "rm"
    if os.path.isfile(os.path.join(output_dir, "actor", "config.json")):
        return "ppo"
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return "model"
    return None


def written_by_fastrlhf(output_dir: str) -> bool:
    """Whether a fastrlhf run or save wrote the dir (its run file, a save's file list, or checkpoints)."""
    return (os.path.isfile(os.path.join(output_dir, RUN_FILE)) or bool(ckpt_lib.checkpoint_dirs(output_dir))
            or os.path.isfile(os.path.join(output_dir, MODEL_MANIFEST)))


def check_output_owner(output_dir: str, overwrite: bool) -> None:
    """As the HF Trainer does: a non-empty dir that fastrlhf did not write is the user's (their files, a
    model downloaded or trained elsewhere) and is refused unless overwrite_output_dir is set. Even
    then a save deletes nothing of theirs (model_files.MODEL_MANIFEST)."""
    entries = sorted(e for e in os.listdir(output_dir) if e != LOCK_FILE)
    if not entries or overwrite or written_by_fastrlhf(output_dir):
        return
    shown = [e + "/" if os.path.isdir(os.path.join(output_dir, e)) else e for e in entries]
    more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
    raise ConfigError(f"output_dir {output_dir} is not empty and was not written by fastrlhf (it holds "
                      f"{', '.join(shown[:8])}{more}): use a new or empty --output_dir, or pass "
                      "--overwrite_output_dir true to write into it (files of the names a run writes are "
                      "replaced; nothing else is deleted)")


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


# ----------------------------------------------------------------------------- the run

@dataclass
class RunContext:
    cfg: Any
    device: torch.device
    rank: int
    world_size: int
    ds_config: Dict[str, Any]
    micro_batch_size: int
    accumulation: int
    global_batch_size: int
    metrics: MetricsLogger
    kind: str = ""  # sft | rm | ppo | dpo (trainer_kind)
    lock: Optional[OutputDirLock] = None  # rank 0's lock on output_dir
    fingerprint: Optional[Dict[str, Any]] = None  # what defines this run (run_fingerprint)
    resume_from: Optional[str] = None  # the checkpoint cfg.resume picked (verified, same fingerprint)
    resume_checked: bool = False


RUN_NAMES = {"sft": "an SFT run", "rm": "a reward-model run", "ppo": "a PPO/GRPO run", "dpo": "a DPO run"}


def _refuse_another_kind(cfg, path: str, saved: Optional[str], kind: str) -> None:
    """A checkpoint of another kind of run (an SFT checkpoint given to `fastrlhf rm`) cannot be continued."""
    if not saved or saved == kind:
        return
    this = RUN_NAMES.get(kind, f"a {kind} run").split(" ", 1)[1]
    fix = (f"continue it with `fastrlhf {saved} ... --resume {path}`, or drop --resume to start this run fresh"
           if cfg.resume != "auto" else
           f"pass --resume no to start this run over in {cfg.output_dir} (its checkpoints are replaced), or use "
           "another --output_dir")
    raise ConfigError(f"{path} is a checkpoint of {RUN_NAMES.get(saved, f'a {saved} run')} (fastrlhf {saved}), "
                      f"not of this {this}: {fix}")


def check_resume(cfg, fingerprint: Dict[str, Any]) -> Optional[str]:
    """The checkpoint cfg.resume picks (verified by checkpoint.find_resume_checkpoint). With 'auto'
    one saved by a different run (another fingerprint) is refused, naming what differs; a dir
    named explicitly is taken with a warning. Runs before anything is loaded."""
    path = ckpt_lib.find_resume_checkpoint(cfg.output_dir, cfg.resume)
    if path is None:
        return None
    state = ckpt_lib.read_trainer_state(path)
    if "fingerprint" not in state:
        print_rank0(f"warning: {path} was saved by an older fastrlhf without a run fingerprint: whether it "
                    "belongs to this run cannot be checked")
    _refuse_another_kind(cfg, path, (state.get("fingerprint") or {}).get("trainer"), fingerprint["trainer"])
    diffs = fingerprint_diff(state.get("fingerprint"), fingerprint)
    if diffs and cfg.resume == "auto":
        raise ConfigError(f"{path} was saved by a different run ({'; '.join(diffs)}): to continue it, rerun "
                          f"with that run's options, or pass --resume {path} to continue it with these (the "
                          "checkpoints are kept); to start over in this dir, pass --resume no (its checkpoints "
                          "are replaced); or use another --output_dir")
    if diffs:
        print_rank0(f"warning: resuming {path} as asked, although it was saved by a different run "
                    f"({'; '.join(diffs)})")
    return path


def _lock_output_dir(cfg, kind: str) -> Optional[OutputDirLock]:
    """Rank 0 locks output_dir and checks what it holds; every rank raises if that failed."""
    lock, error = None, None
    if is_rank0():
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
            lock = OutputDirLock(cfg.output_dir).acquire(kind)
            overwrite = getattr(cfg, "overwrite_output_dir", False)
            check_output_owner(cfg.output_dir, overwrite)
            check_output_kind(cfg.output_dir, kind, overwrite)
            if not read_run_file(cfg.output_dir):  # the dir is fastrlhf's from now on
                write_run_file(cfg.output_dir, kind, STARTED)
        except ConfigError as e:
            if lock is not None:
                lock.release()
            error = e
        except OSError as e:  # not a dir, not writable, ...
            error = ConfigError(f"cannot write to output_dir {cfg.output_dir} ({e.strerror or e}): "
                                "pick a writable directory with --output_dir")
    if not all_ranks_true(error is None):
        raise error or ConfigError(f"rank 0 could not start a run in {cfg.output_dir} (see its message)")
    if lock is not None and lock.stale_note:
        print_rank0(f"warning: {lock.stale_note}")
    return lock


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup_run(cfg, check_tokenizers: bool = True) -> RunContext:
    """Validate cfg, join the process group, seed, build the DeepSpeed config, create the output dir.
    `check_tokenizers`: the tokenizer will be loaded from cfg's paths (none was passed in)."""
    cfg.validate()
    cfg.check_inputs(tokenizers=check_tokenizers)  # paths, kinds, output dir, precision: before anything is written
    quiet_libraries()
    device = init_distributed()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    world = get_world_size()
    ds_config = build_ds_config(cfg, world)
    seed_everything(cfg.seed)
    kind = trainer_kind(cfg)
    lock = _lock_output_dir(cfg, kind)
    try:
        fingerprint = run_fingerprint(cfg, kind)
        resume_from = check_resume(cfg, fingerprint)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if is_rank0():
        save_config(cfg, os.path.join(cfg.output_dir, "training_config.yaml"))
    barrier()
    tb_dir = cfg.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard")
    metrics = MetricsLogger(tb_dir, cfg.report_to, config_to_dict(cfg), cfg.output_dir)  # trackers: rank 0
    return RunContext(cfg=cfg, device=device, rank=get_rank(), world_size=world, ds_config=ds_config,
                      micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
                      accumulation=ds_config["gradient_accumulation_steps"],
                      global_batch_size=ds_config["train_batch_size"], metrics=metrics, kind=kind, lock=lock, fingerprint=fingerprint, resume_from=resume_from, resume_checked=True)


def training_dtype(ctx: RunContext) -> str:
    return ds_precision(ctx.ds_config)


def describe_run(ctx: RunContext, model: nn.Module, n_train: int, n_eval: int, total_steps: int,
                 unit: str = "examples") -> None:
    n_params = sum(full_numel(p) for p in model.parameters())
    n_train_params = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    print_rank0(f"{n_params / 1e6:.2f}M parameters ({n_train_params / 1e6:.2f}M trainable), "
                f"{n_train} train / {n_eval} eval {unit}, {total_steps} steps of {ctx.global_batch_size} "
                f"(micro {ctx.micro_batch_size} x accumulation {ctx.accumulation} x {ctx.world_size} processes), "
                f"ZeRO-{zero_stage(ctx.ds_config)}, {training_dtype(ctx)}")
