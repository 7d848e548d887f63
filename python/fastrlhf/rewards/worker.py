"""User reward functions run in worker processes (`fastrlhf.workers`, the one worker
mechanism of rewards, environments and tools), so that a function that hangs (or leaks, or
crashes the interpreter) cannot freeze or kill the training run.

`FunctionWorker(spec)` runs the `reward` service (`RewardService`): the child resolves the spec
(importing the user's module: never in the trainer's process), says it is ready (naming the
function's source file, which the run's fingerprint hashes), then answers call requests.
`call(...)` waits at most `timeout` seconds for a batch, and a fresh worker at most as long
(`startup_timeout`) for its module to import; past that the worker is killed and restarted and a
RewardTimeoutError names the function. When the function raises, the child retries the rows one
by one to find one offending prompt, and the parent raises a RewardError with the function's
name, the exception and that prompt. Signals, tags and forked copies: see fastrlhf.workers.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any, Dict, List, Optional

from ..errors import RewardError, RewardSpecError, RewardTimeoutError
from ..workers import (WorkerDied, WorkerMismatch, WorkerProcess, WorkerRaised, WorkerRefused,
                                    WorkerTimeout)

# a fresh worker may take --reward_timeout, and at least this long, to import the function's module
MIN_STARTUP_S = 5.0


def startup_timeout(timeout: float) -> float:
    return max(float(timeout), MIN_STARTUP_S)


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


class RewardService:
    """The worker side: one reward function, called on batches."""

    def __init__(self, spec: str):
        from .spec import load_reward_fn
        self.fn = load_reward_fn(spec)

    def ready_info(self) -> Dict[str, Any]:
        return {"source": source_file(self.fn)}

    def handle(self, op: str, payload, budget: float):
        prompts, completions, columns = payload
        return _as_list(self.fn(list(prompts), list(completions), **columns))

    def error_detail(self, exc, op: str, payload, budget: float):
        """(row, located): the first row that raises alone, else 0 (the batch's first)."""
        prompts, completions, columns = payload
        i = _find_offender(self.fn, prompts, completions, columns, budget) if len(prompts) > 1 else 0
        return (0 if i is None else i, i is not None)


class FunctionWorker:
    """One worker process running the reward function `spec` (see the module docstring)."""

    def __init__(self, spec: str, name: str, timeout: float):
        self.spec, self.name, self.timeout = spec, name, float(timeout)
        self.worker = WorkerProcess("reward", [spec], startup_timeout(timeout))
        self.source: Optional[str] = None  # the function's source file, once the worker is ready

    @property
    def proc(self):
        return self.worker.proc

    def wait_ready(self) -> None:
        """Until the worker has imported the function (at most `startup_timeout`); RewardError if it
        cannot (the worker's message: no such module or function, an import that raised), did not
        finish importing in time, or ended the process."""
        limit = startup_timeout(self.timeout)
        try:
            info = self.worker.wait_ready()
        except WorkerTimeout:
            raise RewardTimeoutError(f"reward function {self.name} ({self.spec}): importing its module did not finish "
                                     f"within {limit:g}s (--reward_timeout {self.timeout:g}); the worker was stopped. "
                                     "Make the import faster or raise --reward_timeout") from None
        except WorkerDied as e:
            raise RewardError(f"reward function {self.name} ({self.spec}): its worker process ended while importing "
                              f"the module (exit code {e.code}; does it call exit() or os._exit() at import?); see "
                              "the messages above") from None
        except WorkerRefused as e:
            raise RewardSpecError(str(e)) from None
        self.source = (info or {}).get("source")

    def call(self, prompts: List[str], completions: List[str], columns: Dict[str, list]) -> list:
        """The function's raw result for one batch (validated by the caller)."""
        self.wait_ready()
        try:
            return self.worker.call("call", (prompts, completions, columns), self.timeout, budget=self.timeout / 2)
        except WorkerTimeout:
            raise RewardTimeoutError(
                f"reward function {self.name} did not return within --reward_timeout {self.timeout:g}s on a batch "
                f"of {len(prompts)} completions (first prompt {_short(prompts[0] if prompts else '')}); the worker "
                f"was stopped. Make the function faster or raise --reward_timeout") from None
        except WorkerDied as e:
            raise RewardError(f"reward function {self.name}: its worker process died (exit code {e.code}) on a batch "
                              f"starting with the prompt {_short(prompts[0] if prompts else '')}") from None
        except WorkerMismatch as e:
            raise RewardError(f"reward function {self.name}: its worker {e} (another process wrote to the worker's "
                              "output: does the function fork or start processes that outlive it?); the worker was "
                              "restarted") from None
        except WorkerRaised as e:
            row, located = e.detail or (0, False)
            which = "one offending prompt" if located else "the batch's first prompt"
            raise RewardError(f"reward function {self.name} raised {e.message} on {which}: {_short(prompts[row])} "
                              f"(completion {_short(completions[row])})") from None

    def restart(self) -> None:
        """Kill the worker (it may be stuck in the function); the next call starts a fresh one."""
        self.worker.restart()

    def close(self) -> None:
        self.worker.close()


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
