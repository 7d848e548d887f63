"""The trainer's side of `--env`: environment instances in worker processes, one per trajectory,
stepped asynchronously (the rollout keeps decoding the other trajectories meanwhile).

Both kinds of environment (`EnvPool` for `--env`, `tool_env.ToolEnvironment` for `--tools`) have
the same interface for the rollout driver:
- `reset(ids, prompts, columns) -> [first user message or None]` (blocking);
- `tool_schemas` (the tools to describe in the prompt, or None);
- `submit(iid, action)`; `poll(wait) -> [(iid, StepResult)]`; `pending`; `close(ids)`; `shutdown()`.
Failures of the user's code raise `AgentError` (one line naming the class, the problem and the
prompt): the run stops before the update.
"""
from __future__ import annotations

import select
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import AgentError, ConfigError
from ..rewards.spec import absolute_spec
from ..rewards.worker import startup_timeout
from ..workers import (WorkerDied, WorkerError, WorkerMismatch, WorkerProcess, WorkerRaised, WorkerRefused,
                       WorkerTimeout)


@dataclass
class StepResult:
    """What the rollout does after a model turn: append `messages` [(role, text)] as the
    environment's turn (role "user" or "tool"), add `reward` (None: none this step), stop if `done`."""
    messages: List[Tuple[str, str]] = field(default_factory=list)
    reward: Optional[float] = None
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0


def _short(text: Any, limit: int = 120) -> str:
    s = repr(text)
    return s if len(s) <= limit else s[:limit] + "...'"


def start_workers(service: str, args: Sequence[str], n: int, timeout: float, option: str) -> Tuple[list, Any]:
    """n workers of `service`, ready; (workers, the first one's ready info). A service that cannot
    start is a ConfigError (before any model loads, when called from the config's checks)."""
    workers = [WorkerProcess(service, args, startup_timeout(timeout)) for _ in range(n)]
    try:
        infos = [w.wait_ready() for w in workers]
    except WorkerRefused as e:
        _close(workers)
        raise ConfigError(str(e)) from None
    except WorkerTimeout:
        _close(workers)
        raise ConfigError(f"{option} {' '.join(args)}: importing did not finish within {startup_timeout(timeout):g}s "
                          f"(--env_timeout {timeout:g}); make the import faster or raise --env_timeout") from None
    except WorkerDied as e:
        _close(workers)
        raise ConfigError(f"{option} {' '.join(args)}: the worker process ended while importing (exit code {e.code}; "
                          "does the module call exit() at import?); see the messages above") from None
    return workers, infos[0]


def _close(workers) -> None:
    for w in workers:
        w.close()


def poll_workers(workers: Sequence[WorkerProcess], wait: float) -> List[Tuple[int, int, Any]]:
    """(worker index, tag, value or WorkerError) of the replies there within `wait` seconds."""
    end = time.monotonic() + wait
    while True:
        out = [(i, tag, value) for i, w in enumerate(workers) if w.pending for tag, value in w.poll(0.0)]
        left = end - time.monotonic()
        if out or left <= 0 or not any(w.pending for w in workers):
            return out
        fds = [w.proc.stdout.fileno() for w in workers if w.pending and w.proc is not None]
        select.select(fds, [], [], min(left, 0.05))


class EnvPool:
    """`--env SPEC`: instances of the class in `n_workers` worker processes (instance i in worker
    i mod n), each call within `timeout` seconds."""

    def __init__(self, spec: str, n_workers: int = 1, timeout: float = 30.0):
        self.spec, self.timeout = absolute_spec(spec), float(timeout)
        self.workers, info = start_workers("env", [self.spec], n_workers, timeout, "--env")
        self.name = info["name"]
        self.source = info.get("source")
        self.tool_schemas = None
        self._calls: Dict[Tuple[int, int], Tuple[int, str]] = {}  # (worker, tag) -> (instance, op)
        self.prompts: Dict[int, str] = {}

    def _worker(self, iid: int) -> int:
        return iid % len(self.workers)

    @property
    def pending(self) -> int:
        """Steps submitted and not yet collected."""
        return sum(op == "step" for _, op in self._calls.values())

    def _submit(self, iid: int, op: str, payload) -> None:
        w = self._worker(iid)
        try:
            tag = self.workers[w].submit(op, payload, self.timeout)
        except WorkerError as e:
            raise self._error(iid, op, e) from None
        self._calls[(w, tag)] = (iid, op)

    def reset(self, ids: Sequence[int], prompts: Sequence[str], columns: Sequence[Dict[str, Any]]) -> List[Optional[str]]:
        for iid, prompt, cols in zip(ids, prompts, columns):
            self.prompts[iid] = prompt
            self._submit(iid, "reset", (iid, prompt, dict(cols)))
        firsts: Dict[int, Optional[str]] = {}
        while len(firsts) < len(ids):
            for iid, op, value in self._collect(1.0):
                if op == "reset":
                    firsts[iid] = value
        return [firsts[i] for i in ids]

    def submit(self, iid: int, action: str) -> None:
        self._submit(iid, "step", (iid, action))

    def poll(self, wait: float = 0.0) -> List[Tuple[int, StepResult]]:
        out = []
        for iid, op, step in self._collect(wait):
            if op != "step":
                continue
            obs = step["observation"]
            messages = [] if step["done"] and obs is None else [("user", obs or "")]
            out.append((iid, StepResult(messages, step["reward"], step["done"])))
        return out

    def _collect(self, wait: float) -> List[Tuple[int, str, Any]]:
        out = []
        for w, tag, value in poll_workers(self.workers, wait):
            iid, op = self._calls.pop((w, tag))
            if isinstance(value, BaseException):
                raise self._error(iid, op, value)
            status, payload = value
            if status == "malformed":
                raise AgentError(f"environment {self.name} {payload} (prompt {_short(self.prompts.get(iid))}); the run "
                                 "stopped before this step's update")
            out.append((iid, op, payload))
        return out

    def _error(self, iid: int, op: str, e: BaseException) -> AgentError:
        call, prompt = f"{op}()", _short(self.prompts.get(iid))
        if isinstance(e, WorkerRaised):
            return AgentError(f"environment {self.name} raised {e.message} in {call} on the prompt {prompt}; the run "
                              "stopped before this step's update")
        if isinstance(e, WorkerTimeout):
            return AgentError(f"environment {self.name} did not return from {call} within --env_timeout "
                              f"{self.timeout:g}s (prompt {prompt}); its worker was stopped. Make it faster or raise "
                              "--env_timeout")
        if isinstance(e, WorkerMismatch):
            return AgentError(f"environment {self.name}: its worker {e} (does it fork processes that outlive it?)")
        return AgentError(f"environment {self.name}: its worker process {e} in {call} (prompt {prompt})")

    def close(self, ids: Sequence[int]) -> None:
        """Drop the instances (their close() runs in the worker; not waited for)."""
        by_worker: Dict[int, List[int]] = {}
        for iid in ids:
            by_worker.setdefault(self._worker(iid), []).append(iid)
            self.prompts.pop(iid, None)
        for w, iids in by_worker.items():
            try:
                tag = self.workers[w].submit("close", iids, self.timeout)
                self._calls[(w, tag)] = (iids[0], "close")
            except WorkerError:
                pass

    def drain(self) -> None:
        """Wait for what was submitted (close requests included)."""
        while self._calls:
            self._collect(1.0)

    def shutdown(self) -> None:
        _close(self.workers)
        self._calls.clear()
