"""`--tools SPEC ...`: the built-in tool environment. The tools run in worker processes
(`agents.service.ToolService`); this side parses the model's turn for tool calls, sends each to a
worker with `--env_timeout`, and answers each with a tool turn. A bad call (unknown name, bad
JSON, arguments that do not fit, an exception, a timeout) is answered with an error text, never a
crash. A turn without a tool call ends the trajectory. The environment interface is
`envs.EnvPool`'s."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..rewards.spec import absolute_spec
from ..workers import WorkerError, WorkerLost, WorkerTimeout
from .envs import StepResult, poll_workers, start_workers, _close
from .tools import BadToolCall, parse_tool_calls


class ToolEnvironment:
    name = "tools"

    def __init__(self, specs: Sequence[str], n_workers: int = 1, timeout: float = 30.0):
        self.specs, self.timeout = [absolute_spec(s) for s in specs], float(timeout)
        self.workers, info = start_workers("tools", self.specs, n_workers, timeout, "--tools")
        self.tool_schemas: List[Dict[str, Any]] = info["schemas"]
        self.sources = info.get("sources", [])
        self._calls: Dict[Tuple[int, int], Tuple[int, int, str, dict]] = {}  # (worker, tag) -> (iid, k, name, args)
        self._open: Dict[int, List[Optional[Tuple[str, bool]]]] = {}        # iid -> [(text, is_error) per call]
        self._ready: List[Tuple[int, StepResult]] = []
        self._next_worker = 0

    @property
    def pending(self) -> int:
        return len(self._open) + len(self._ready)

    def reset(self, ids, prompts, columns) -> List[Optional[str]]:
        return [None] * len(ids)   # the prompt stays; the renderer describes the tools in it

    def submit(self, iid: int, action: str) -> None:
        calls = parse_tool_calls(action)
        if not calls:
            self._ready.append((iid, StepResult(done=True)))
            return
        self._open[iid] = [None] * len(calls)
        for k, call in enumerate(calls):
            if isinstance(call, BadToolCall):
                self._open[iid][k] = (call.error, True)
            else:
                self._send(iid, k, call.name, call.arguments)
        self._finish_if_answered(iid)

    def _send(self, iid: int, k: int, name: str, arguments: dict) -> None:
        w = self._next_worker = (self._next_worker + 1) % len(self.workers)
        try:
            tag = self.workers[w].submit("call", (name, arguments), self.timeout)
        except WorkerError as e:
            self._open[iid][k] = (f"error: the tool {name} could not run ({e})", True)
            return
        self._calls[(w, tag)] = (iid, k, name, arguments)

    def _finish_if_answered(self, iid: int) -> None:
        answers = self._open[iid]
        if any(a is None for a in answers):
            return
        del self._open[iid]
        errors = sum(is_error for _, is_error in answers)
        self._ready.append((iid, StepResult([("tool", text) for text, _ in answers], None, False,
                                            tool_calls=len(answers), tool_errors=errors)))

    def poll(self, wait: float = 0.0) -> List[Tuple[int, StepResult]]:
        if self._ready:
            wait = 0.0
        for w, tag, value in poll_workers(self.workers, wait):
            iid, k, name, arguments = self._calls.pop((w, tag))
            if isinstance(value, WorkerLost):   # queued behind a call that timed out: never ran
                self._send(iid, k, name, arguments)
                continue
            if isinstance(value, WorkerTimeout):
                answer = (f"error: the tool {name} did not answer within {self.timeout:g}s", True)
            elif isinstance(value, BaseException):
                answer = (f"error: the tool {name} failed ({getattr(value, 'message', value)})", True)
            else:
                status, text = value
                answer = (text, status != "ok")
            self._open[iid][k] = answer
            self._finish_if_answered(iid)
        out, self._ready = self._ready, []
        return out

    def close(self, ids) -> None:
        for iid in ids:
            self._open.pop(iid, None)

    def drain(self) -> None:
        pass

    def shutdown(self) -> None:
        _close(self.workers)
        self._calls.clear()
