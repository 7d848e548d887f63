"""User reward functions run in worker processes, so that a function that hangs (or leaks,
or crashes the interpreter) cannot freeze or kill the training run.

`FunctionWorker(spec)` starts `python -m fastrlhf.rewards.worker SPEC` with the parent's
sys.path; the child resolves the spec (importing the user's module: never in the trainer's
process), says it is ready (naming the function's source file, which the run's fingerprint
hashes), then answers call requests. Messages are length-prefixed pickles over the child's
stdin/stdout (the child's own prints go to stderr); each request carries a number that its reply
repeats, and a reply to another request is refused. `call(...)` waits at most `timeout` seconds
for a batch, and a fresh worker at most as long (`startup_timeout`) for its module to import; past
that the worker is killed and restarted and a RewardTimeoutError names the function. When the
function raises, the child retries the rows one by one to find one offending prompt, and the
parent raises a RewardError with the function's name, the exception and that prompt.

Lifetime and signals: the child runs in a session (process group) of its own and ignores SIGINT
and SIGTERM, so Ctrl-C in a terminal or a scheduler's SIGTERM to the run's process group reaches
the trainer only, which finishes its step (rewards included), saves and exits. The child exits
when its stdin closes, so it never outlives the parent; a copy of it that the function forked
and that returns into the worker's loop exits there instead of answering.
"""
from __future__ import annotations

import inspect
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
import weakref
from typing import Any, Dict, List, Optional

from ..errors import RewardError, RewardSpecError, RewardTimeoutError

_HEADER = struct.Struct("!Q")
# a fresh worker may take --reward_timeout, and at least this long, to import the function's module
MIN_STARTUP_S = 5.0


def startup_timeout(timeout: float) -> float:
    return max(float(timeout), MIN_STARTUP_S)


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


def source_file(fn) -> Optional[str]:
    """The file that defines `fn` (its module's, for objects without source), or None."""
    try:
        path = inspect.getsourcefile(fn) or inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        path = None
    if path is None:
        path = getattr(sys.modules.get(getattr(fn, "__module__", None) or ""), "__file__", None)
    return os.path.abspath(path) if path else None


def serve(spec: str) -> int:
    """The child's loop (runs in the worker process)."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the trainer's to handle (see the module docstring)
        signal.signal(signum, signal.SIG_IGN)
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
    _write(proto_out, ("ready", {"source": source_file(fn)}))
    fd, me = proto_in.fileno(), os.getpid()
    while True:
        try:
            msg = _read(fd, None)
        except EOFError:
            return 0
        if msg[0] == "stop":
            return 0
        _, seq, prompts, completions, columns, budget = msg
        stop = False
        try:
            reply = ("ok", seq, _as_list(fn(list(prompts), list(completions), **columns)))
        except Exception as e:
            i = _find_offender(fn, prompts, completions, columns, budget) if len(prompts) > 1 else 0
            reply = ("raised", seq, f"{type(e).__name__}: {e}{_where(e)}", 0 if i is None else i, i is not None)
        except BaseException as e:  # SystemExit and friends from user code: report, then stop
            reply, stop = ("raised", seq, f"{type(e).__name__}: {e}{_where(e)}", 0, False), True
        if os.getpid() != me:  # a copy forked by the function came back here: only the worker answers
            os._exit(0)
        _write(proto_out, reply)
        if stop:
            return 1


class FunctionWorker:
    """One worker process running the reward function `spec` (see the module docstring)."""

    def __init__(self, spec: str, name: str, timeout: float):
        self.spec, self.name, self.timeout = spec, name, float(timeout)
        self.proc: Optional[subprocess.Popen] = None
        self.source: Optional[str] = None  # the function's source file, once the worker is ready
        self._ready = False
        self._seq = 0
        self._finalizer = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in sys.path if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastrlhf.rewards.worker", self.spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=os.getcwd(),
                                     start_new_session=True)  # the run's group signals are the trainer's
        self._ready = False
        self._finalizer = weakref.finalize(self, _stop, self.proc)

    def wait_ready(self) -> None:
        """Until the worker has imported the function (at most `startup_timeout`); RewardError if it
        cannot (the worker's message: no such module or function, an import that raised), did not
        finish importing in time, or ended the process."""
        if self.proc is None:
            self.start()
        if self._ready:
            return
        limit = startup_timeout(self.timeout)
        try:
            kind, detail = _read(self.proc.stdout.fileno(), time.monotonic() + limit)
        except TimeoutError:
            self.restart()
            raise RewardTimeoutError(f"reward function {self.name} ({self.spec}): importing its module did not finish "
                                     f"within {limit:g}s (--reward_timeout {self.timeout:g}); the worker was stopped. "
                                     "Make the import faster or raise --reward_timeout") from None
        except EOFError:
            time.sleep(0.05)
            code = self.proc.poll()
            self.close()
            raise RewardError(f"reward function {self.name} ({self.spec}): its worker process ended while importing "
                              f"the module (exit code {code}; does it call exit() or os._exit() at import?); see "
                              "the messages above") from None
        if kind != "ready":
            self.close()
            raise RewardSpecError(detail)
        self.source = (detail or {}).get("source")
        self._ready = True


    def call(self, prompts: List[str], completions: List[str], columns: Dict[str, list]) -> list:
        """The function's raw result for one batch (validated by the caller)."""
        self.wait_ready()
        self._seq += 1
        try:
            _write(self.proc.stdin, ("call", self._seq, prompts, completions, columns, self.timeout / 2))
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
        if reply[1] != self._seq:
            self.restart()
            raise RewardError(f"reward function {self.name}: its worker answered request {reply[1]} while request "
                              f"{self._seq} was waiting (another process wrote to the worker's output: does the "
                              "function fork or start processes that outlive it?); the worker was restarted")
        if reply[0] == "ok":
            return reply[2]
        _, _, error, row, located = reply
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


# (working dir, absolute spec) -> the function's source file, as the last check in this process found it
_checked_sources: Dict[tuple, Optional[str]] = {}


def _source_key(spec: str) -> tuple:
    from .spec import absolute_spec
    return os.getcwd(), absolute_spec(spec)  # `my_rewards:fn` is looked up in the working dir


def check_reward_functions(specs: List[str], timeout: float) -> Dict[str, Optional[str]]:
    """{spec: the function's source file} once each spec's worker has imported it (all at once, each
    within `startup_timeout(timeout)`); the first failure raises (RewardSpecError for a spec that names
    no function, RewardError for an import that hangs or ends the process). The user's code is
    imported in the workers only, never in this process."""
    from .spec import absolute_spec, spec_name
    workers = [FunctionWorker(absolute_spec(spec), spec_name(spec), timeout) for spec in specs]
    try:
        for w in workers:
            w.wait_ready()
    finally:
        for w in workers:
            w.close()
    found = {spec: w.source for spec, w in zip(specs, workers)}
    _checked_sources.update({_source_key(spec): path for spec, path in found.items()})
    return found


def reward_source_files(specs: List[str], timeout: float) -> List[Optional[str]]:
    """The source file of each reward function (from this process's last check of it, else a new
    check): what a run's fingerprint hashes, so that editing a reward function is a different run."""
    missing = [spec for spec in specs if _source_key(spec) not in _checked_sources]
    if missing:
        check_reward_functions(missing, timeout)
    return [_checked_sources[_source_key(spec)] for spec in specs]


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
