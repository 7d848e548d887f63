"""The worker side of environments and tools (`fastrlhf.workers` services): the user's classes and
functions are imported, checked and run here, never in the trainer's process.

- `EnvService(spec)`: the environment class; instances by id (`reset` creates one, `close` drops
  it). Replies are ("ok", value) or ("malformed", message) for a step() result that is not a Step
  (`step.as_step_dict`) or a reset() result that is not str/None; an exception in user code is the
  worker's "raised" reply.
- `ToolService(*specs)`: the tool functions and their schemas (ready info); a call answers
  ("ok", text) or ("error", text for the model): unknown tool, arguments that do not fit, an
  exception in the tool.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, List

from ..rewards.spec import load_object, spec_name
from ..rewards.worker import source_file
from ..workers import describe
from .step import MalformedStep, as_step_dict
from .tools import ToolSpecError, check_arguments, format_result, tool_schema

REQUIRED_METHODS = ("reset", "step")


class EnvSpecProblem(ValueError):
    """An environment class that cannot be used (missing methods, cannot be constructed)."""


def check_env_class(cls, spec: str) -> None:
    """`reset` and `step` are methods (a misspelled one named with the closest name found), and
    the class constructs without arguments."""
    name = cls.__name__
    for method in REQUIRED_METHODS:
        if callable(getattr(cls, method, None)):
            continue
        have = [k for k in dir(cls) if not k.startswith("_") and callable(getattr(cls, k, None))]
        close = difflib.get_close_matches(method, have, n=1, cutoff=0.6)
        hint = f" (it has {close[0]!r}: misspelled?)" if close else (f"; it has {', '.join(have)}" if have else "")
        raise EnvSpecProblem(f"--env {spec!r}: the class {name} has no method {method}(){hint}; an environment "
                             "defines reset(prompt, **columns) -> str | None and step(action) -> Step")
    try:
        inspect.signature(cls.step).bind(None, "action")
    except TypeError:
        raise EnvSpecProblem(f"--env {spec!r}: {name}.step must take one argument, the text of the model's turn: "
                             "def step(self, action)") from None
    try:
        instance = cls()
    except Exception as e:
        raise EnvSpecProblem(f"--env {spec!r}: {name}() raised {describe(e)}; an environment is constructed "
                             "without arguments, once per trajectory") from None
    close = getattr(instance, "close", None)
    if callable(close):
        close()


class EnvService:
    def __init__(self, spec: str):
        self.spec = spec
        self.cls = load_object(spec, "--env", "class")
        check_env_class(self.cls, spec)
        self.instances: Dict[int, Any] = {}

    def ready_info(self) -> Dict[str, Any]:
        return {"name": self.cls.__name__, "source": source_file(self.cls)}

    def handle(self, op: str, payload, budget: float):
        if op == "reset":
            iid, prompt, columns = payload
            env = self.instances[iid] = self.cls()
            first = env.reset(prompt, **columns)
            if first is not None and not isinstance(first, str):
                return ("malformed", f"reset() returned a {type(first).__name__} ({first!r:.60}); it returns the first "
                                     "user message (str) or None to keep the prompt")
            return ("ok", first)
        if op == "step":
            iid, action = payload
            try:
                return ("ok", as_step_dict(self.instances[iid].step(action)))
            except MalformedStep as e:
                return ("malformed", f"step() {e}")
        if op == "close":
            for iid in payload:
                env = self.instances.pop(iid, None)
                close = getattr(env, "close", None)
                if callable(close):
                    close()
            return ("ok", None)
        raise ValueError(f"unknown environment request {op!r}")


def load_tools(specs: List[str]) -> Dict[str, Any]:
    """{name: (function, schema)}; the first problem raises (ToolSpecError / RewardSpecError)."""
    tools: Dict[str, Any] = {}
    where: Dict[str, str] = {}
    for spec in specs:
        fn = load_object(spec, "--tools", "function")
        if isinstance(fn, type):
            raise ToolSpecError(f"--tools {spec!r}: {fn.__name__} is a class; a tool is a function (with type hints "
                                "and a docstring)")
        name = getattr(fn, "__name__", spec_name(spec))
        if name in tools:
            raise ToolSpecError(f"--tools: two tools are named {name!r} ({where[name]} and {spec}); the model calls "
                                "tools by name, so names must be unique: rename one")
        try:
            schema = tool_schema(fn, name)
        except ToolSpecError as e:
            raise ToolSpecError(f"--tools {spec!r}: {e}") from None
        tools[name], where[name] = (fn, schema), spec
    return tools


class ToolService:
    def __init__(self, *specs: str):
        self.tools = load_tools(list(specs))

    def ready_info(self) -> Dict[str, Any]:
        return {"schemas": [schema for _, schema in self.tools.values()],
                "sources": [source_file(fn) for fn, _ in self.tools.values()]}

    def handle(self, op: str, payload, budget: float):
        if op != "call":
            raise ValueError(f"unknown tool request {op!r}")
        name, arguments = payload
        if name not in self.tools:
            return ("error", f"error: there is no tool {name!r}; the tools are {', '.join(sorted(self.tools))}")
        fn, schema = self.tools[name]
        problem = check_arguments(schema, arguments)
        if problem is not None:
            return ("error", problem)
        try:
            return ("ok", format_result(fn(**arguments)))
        except Exception as e:
            return ("error", f"error: {name} raised {type(e).__name__}: {e}")
