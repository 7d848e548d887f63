"""User reward functions run in worker processes, so that a function that hangs (or leaks,
or crashes the interpreter) cannot freeze or kill the training run.

`FunctionWorker(spec)` starts `python -m fastrlhf.rewards.worker SPEC` with the parent's
sys.path; the child resolves the spec, says it is ready, then answers call requests. Messages
are length-prefixed pickles over the child's stdin/stdout (the child's own prints go to stderr).
`call(...)` waits at most `timeout` seconds for a batch; past that the worker is killed and
restarted and a RewardTimeoutError names the function. When the function raises, the child
retries the rows one by one to find one offending prompt, and the parent raises a RewardError
with the function's name, the exception and that prompt. The child exits when its stdin closes,
so it never outlives the parent.
"""
from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import time
import traceback
import weakref
from typing import Any, Dict, List, Optional

from ..errors import RewardError, RewardTimeoutError

_HEADER = struct.Struct("!Q")
# how long a fresh worker may take to import the function's module (then the per-batch timeout runs)
STARTUP_TIMEOUT = 120.0


def _write(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(fd: int, n: int, deadline: Optional[float]) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: Optional[float]):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


def _as_list(values):
    """Arrays and tensors become lists here, so the parent never unpickles a foreign type."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return [v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v for v in values]
    return values


def _short(text: Any, limit: int = 200) -> str:
    s = repr(text)
    return s if len(s) <= limit else s[:limit] + "...'"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno})"


def _find_offender(fn, prompts, completions, columns, budget: float) -> Optional[int]:
    """The first row that raises on its own, within `budget` seconds; None if none does."""
    deadline = time.monotonic() + budget
    for i in range(len(prompts)):
        if time.monotonic() > deadline:
            return None
        try:
            fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return i
    return None


def serve(spec: str) -> int:
    """The child's loop (runs in the worker process)."""
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # the function's prints go to stderr, never into the protocol stream
    sys.stdout = sys.stderr
    from .spec import load_reward_fn
    try:
        fn = load_reward_fn(spec)
    except Exception as e:
        _write(proto_out, ("error", str(e)))
        return 1
    _write(proto_out, ("ready", None))
    fd = proto_in.fileno()
    while True:
        try:
            msg = _read(fd, None)
        except EOFError:
            return 0
        if msg[0] == "stop":
            return 0
        _, prompts, completions, columns, budget = msg
        try:
            result = _as_list(fn(list(prompts), list(completions), **columns))
            _write(proto_out, ("ok", result))
        except Exception as e:
            i = _find_offender(fn, prompts, completions, columns, budget) if len(prompts) > 1 else 0
            row = 0 if i is None else i
            _write(proto_out, ("raised", f"{type(e).__name__}: {e}{_where(e)}", row, i is not None))
        except BaseException as e:  # SystemExit and friends from user code: report, then stop
            _write(proto_out, ("raised", f"{type(e).__name__}: {e}{_where(e)}", 0, False))
            return 1


class FunctionWorker:
    """One worker process running the reward function `spec` (see the module docstring)."""

    def __init__(self, spec: str, name: str, timeout: float):
        self.spec, self.name, self.timeout = spec, name, float(timeout)
        self.proc: Optional[subprocess.Popen] = None
        self._ready = False
        self._finalizer = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in sys.path if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastrlhf.rewards.worker", self.spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=os.getcwd())
        self._ready = False
        self._finalizer = weakref.finalize(self, _stop, self.proc)

    def _wait_ready(self) -> None:
        if self.proc is None:
            self.start()
        if self._ready:
            return
        try:
            kind, detail = _read(self.proc.stdout.fileno(), time.monotonic() + max(STARTUP_TIMEOUT, self.timeout))
        except (TimeoutError, EOFError):
            self.close()
            raise RewardError(f"reward function {self.name} ({self.spec}): its worker process did not start "
                              f"(exit code {self.proc.poll()}); see the messages above") from None
        if kind != "ready":
            self.close()
            raise RewardError(f"reward function {self.name}: {detail}")
        self._ready = True

    def call(self, prompts: List[str], completions: List[str], columns: Dict[str, list]) -> list:
        """The function's raw result for one batch (validated by the caller)."""
        self._wait_ready()
        try:
            _write(self.proc.stdin, ("call", prompts, completions, columns, self.timeout / 2))
            reply = _read(self.proc.stdout.fileno(), time.monotonic() + self.timeout)
        except TimeoutError:
            self.restart()
            raise RewardTimeoutError(
                f"reward function {self.name} did not return within --reward_timeout {self.timeout:g}s on a batch "
                f"of {len(prompts)} completions (first prompt {_short(prompts[0] if prompts else '')}); the worker "
                f"was stopped. Make the function faster or raise --reward_timeout") from None
        except (EOFError, BrokenPipeError, OSError):
            time.sleep(0.05)
            code = self.proc.poll()
            self.restart()
            raise RewardError(f"reward function {self.name}: its worker process died (exit code {code}) on a batch "
                              f"starting with the prompt {_short(prompts[0] if prompts else '')}") from None
        if reply[0] == "ok":
            return reply[1]
        _, error, row, located = reply
        which = "one offending prompt" if located else "the batch's first prompt"
        raise RewardError(f"reward function {self.name} raised {error} on {which}: {_short(prompts[row])} "
                          f"(completion {_short(completions[row])})")

    def restart(self) -> None:
        """Kill the worker (it may be stuck in the function); the next call starts a fresh one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()
        self.proc = None

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.close()      # the child exits at EOF
            proc.wait(timeout=1.0)
        except Exception:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
