"""Worker processes for user code (reward functions, environments, tools): one mechanism, so that
code that hangs, leaks or crashes the interpreter cannot freeze or kill the training run.

`WorkerProcess(service, args)` starts `python -m fastrlhf.workers SERVICE ARGS...`
with the parent's sys.path. The child builds the service (`SERVICES`; this is where the user's
module is imported: never in the trainer's process), says it is ready (with what the service
reports, e.g. a function's source file or tool schemas) or why not, then answers requests.
Messages are length-prefixed pickles over the child's stdin/stdout (the child's own prints go to
stderr). Each request carries a tag that its reply repeats; a reply to another request is refused.

Requests may be pipelined: `submit()` sends one and returns its tag, `poll()` collects the
replies that are there. The child answers in order, so each request's deadline counts from when
the child starts it (its predecessor's reply). Past a deadline the worker is killed (it may be
stuck in user code): that request fails with `WorkerTimeout`, the ones queued behind it with
`WorkerLost`, and the next request starts a fresh worker. `call()` is submit + wait.

Lifetime and signals: the child runs in a session (process group) of its own and ignores SIGINT
and SIGTERM, so Ctrl-C in a terminal or a scheduler's SIGTERM to the run's process group reaches
the trainer only, which finishes its step, saves and exits. The child exits when its stdin closes,
so it never outlives the parent; a copy of it that user code forked and that returns into the
worker's loop exits there instead of answering.

A service is a class built from the command line's string arguments, with `ready_info()` (a
picklable value for the parent), `handle(op, payload, budget)` (the reply's value; `budget`: the
seconds the parent waits) and optionally `error_detail(exc, op, payload, budget)` (extra detail
for a request whose handling raised, e.g. the offending row of a batch).
"""
from __future__ import annotations

import collections
import importlib
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
from typing import Any, Deque, List, Optional, Sequence, Tuple

# name -> "module:class" of the service the child runs
SERVICES = {
    "reward": "fastrlhf.rewards.worker:RewardService",
    "env": "fastrlhf.agents.service:EnvService",
    "tools": "fastrlhf.agents.service:ToolService",
}

_HEADER = struct.Struct("!Q")


class WorkerError(Exception):
    """Base of what a worker request can end in, besides its value."""


class WorkerRefused(WorkerError):
    """The child could not build its service (e.g. no such module or class): the child's message."""


class WorkerDied(WorkerError):
    """The child ended (exit code in `.code`, None when unknown)."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.code = code


class WorkerTimeout(WorkerError):
    """No reply within the request's deadline; the worker was killed."""


class WorkerLost(WorkerError):
    """Queued behind a request that timed out: never handled, may be sent again."""


class WorkerRaised(WorkerError):
    """The service raised while handling the request: `.message` ("Type: text (at file:line)") and
    the service's `.detail` (None unless it has `error_detail`)."""

    def __init__(self, message: str, detail: Any = None):
        super().__init__(message)
        self.message, self.detail = message, detail


class WorkerMismatch(WorkerError):
    """A reply carried another request's tag (something else wrote to the worker's output)."""


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


def where(exc: BaseException) -> str:
    """" (at file.py:line)" of the innermost frame of `exc`'s traceback, or ""."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno})"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}{where(exc)}"


def _service_class(name: str):
    module, _, attr = SERVICES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def serve(service_name: str, args: Sequence[str]) -> int:
    """The child's loop (runs in the worker process)."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # the trainer's to handle (see the module docstring)
        signal.signal(signum, signal.SIG_IGN)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # user code's prints go to stderr, never into the protocol stream
    sys.stdout = sys.stderr
    try:
        service = _service_class(service_name)(*args)
        ready = service.ready_info()
    except Exception as e:
        _write(proto_out, ("error", str(e) or describe(e)))
        return 1
    _write(proto_out, ("ready", ready))
    fd, me = proto_in.fileno(), os.getpid()
    detail_of = getattr(service, "error_detail", None)
    while True:
        try:
            msg = _read(fd, None)
        except EOFError:
            return 0
        if msg[0] == "stop":
            return 0
        _, tag, op, payload, budget = msg
        stop = False
        try:
            reply = ("ok", tag, service.handle(op, payload, budget))
        except Exception as e:
            detail = detail_of(e, op, payload, budget) if detail_of is not None else None
            reply = ("raised", tag, describe(e), detail)
        except BaseException as e:  # SystemExit and friends from user code: report, then stop
            reply, stop = ("raised", tag, describe(e), None), True
        if os.getpid() != me:  # a copy forked by user code came back here: only the worker answers
            os._exit(0)
        _write(proto_out, reply)
        if stop:
            return 1


class WorkerProcess:
    """One worker process running `service` (see the module docstring)."""

    def __init__(self, service: str, args: Sequence[str], startup_timeout: float):
        if service not in SERVICES:
            raise ValueError(f"unknown worker service {service!r}; one of {', '.join(SERVICES)}")
        self.service, self.args, self.startup_timeout = service, [str(a) for a in args], float(startup_timeout)
        self.proc: Optional[subprocess.Popen] = None
        self.ready_info: Any = None
        self._ready = False
        self._tag = 0
        # (tag, timeout, started_at or None): requests sent and not answered, in order
        self._pending: Deque[List[Any]] = collections.deque()
        self._finalizer = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in sys.path if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastrlhf.workers", self.service,
                                      *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     cwd=os.getcwd(), start_new_session=True)  # the run's group signals are the trainer's
        self._ready = False
        self._pending.clear()
        self._finalizer = weakref.finalize(self, _stop, self.proc)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> Any:
        """The service's ready_info, once the child has built it (at most startup_timeout s).
        WorkerTimeout (the child is stopped), WorkerDied (it ended while starting: exit code) or
        WorkerRefused (its message)."""
        if self.proc is None:
            self.start()
        if self._ready:
            return self.ready_info
        try:
            kind, detail = _read(self.proc.stdout.fileno(), time.monotonic() + self.startup_timeout)
        except TimeoutError:
            self.restart()
            raise WorkerTimeout(f"did not start within {self.startup_timeout:g}s") from None
        except EOFError:
            code = self._exit_code()
            self.close()
            raise WorkerDied(f"ended while starting (exit code {code})", code) from None
        if kind != "ready":
            self.close()
            raise WorkerRefused(detail)
        self.ready_info, self._ready = detail, True
        return detail

    def submit(self, op: str, payload: Any, timeout: float, budget: Optional[float] = None) -> int:
        """Send a request; its tag. `timeout`: seconds it may take once the child starts it;
        `budget`: what the service is told it has (default timeout)."""
        self.wait_ready()
        self._tag += 1
        try:
            _write(self.proc.stdin, ("call", self._tag, op, payload, timeout if budget is None else budget))
        except (BrokenPipeError, OSError):
            code = self._exit_code()
            self.restart()
            raise WorkerDied(f"died (exit code {code})", code) from None
        started = time.monotonic() if not self._pending else None
        self._pending.append([self._tag, float(timeout), started])
        return self._tag

    @property
    def pending(self) -> int:
        return len(self._pending)

    def poll(self, wait: float = 0.0) -> List[Tuple[int, Any]]:
        """(tag, value or WorkerError) of the requests answered within `wait` seconds (0: only what
        is there now), in order. A timeout or a death fails the pending requests (see the module
        docstring) and restarts the worker on the next submit."""
        out: List[Tuple[int, Any]] = []
        end = time.monotonic() + wait
        while self._pending:
            head = self._pending[0]
            if head[2] is None:
                head[2] = time.monotonic()
            deadline = head[2] + head[1]
            now = time.monotonic()
            fd = self.proc.stdout.fileno()
            if not select.select([fd], [], [], max(0.0, min(deadline, end) - now))[0]:
                if time.monotonic() >= deadline:
                    out += self._fail_all(WorkerTimeout(f"no reply within {head[1]:g}s"))
                    break
                if time.monotonic() >= end:
                    break
                continue
            try:
                reply = _read(fd, deadline)
            except TimeoutError:
                out += self._fail_all(WorkerTimeout(f"no reply within {head[1]:g}s"))
                break
            except EOFError:
                code = self._exit_code()
                out += self._fail_all(WorkerDied(f"died (exit code {code})", code))
                break
            self._pending.popleft()
            if reply[1] != head[0]:
                mismatch = WorkerMismatch(f"answered request {reply[1]} while request {head[0]} was waiting")
                out.append((head[0], mismatch))
                out += self._fail_all(WorkerLost("restarted after a mismatched reply"))
                break
            if self._pending:
                self._pending[0][2] = time.monotonic()
            out.append((head[0], reply[2] if reply[0] == "ok" else WorkerRaised(reply[2], reply[3])))
        return out

    def call(self, op: str, payload: Any, timeout: float, budget: Optional[float] = None) -> Any:
        """submit + wait: the value, or the WorkerError raised."""
        tag = self.submit(op, payload, timeout, budget)
        while True:
            for t, value in self.poll(wait=timeout + 1.0):
                if t == tag:
                    if isinstance(value, BaseException):
                        raise value
                    return value

    def _fail_all(self, first: WorkerError) -> List[Tuple[int, Any]]:
        tags = [p[0] for p in self._pending]
        self.restart()
        return [(t, first if i == 0 else WorkerLost("queued behind a request that failed")) for i, t in enumerate(tags)]

    def _exit_code(self) -> Optional[int]:
        time.sleep(0.05)
        return self.proc.poll() if self.proc is not None else None

    def restart(self) -> None:
        """Kill the worker (it may be stuck in user code); the next request starts a fresh one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()
        self.proc = None
        self._pending.clear()

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
    sys.exit(serve(sys.argv[1], sys.argv[2:]))
