"""How every kernel in fastrlhf.kernels is launched.

Kernels and the device functions they call are ordinary `@triton.jit` functions. `Kernel`
adds what a plain `kernel[grid](...)` does not give us:

- **The GPU/interpreter choice per launch.** Triton makes that choice when a function is
  decorated (`triton.jit` returns an interpreted function while TRITON_INTERPRET=1 is set),
  so our kernels and helpers, and triton.language's own jitted library (tl.sum, tl.max,
  tl.cdiv, ...), keep the mode that was in force when they were imported. The test suite
  sets TRITON_INTERPRET=1 per test, in one process that also compiles for the GPU, so an
  interpreted launch decorates the kernel's source again under the interpreter and swaps
  interpreted copies in for the jitted functions it calls (`_interpreted_helpers`). This
  uses only public names (`triton.jit`, `triton.knobs.runtime.interpret`,
  `triton.runtime.JITFunction` and its `.fn`); the two behaviours of Triton it relies on
  are written down at `_interpreted_helpers`. Kernels imported while TRITON_INTERPRET=1 was
  set can only be interpreted.
- **Launch configurations**: GPU autotuning over the given configs; under the interpreter
  one small config (it runs every program in Python, so fewer, larger tiles are much faster
  and autotuning would only multiply the run time).
- Poisoned outputs for tests (`poison_outputs`) and an ahead-of-time compile check for a
  GPU architecture without a GPU (`compile_only`).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime import JITFunction


def interpreting() -> bool:
    """True when kernels launched now run in Triton's CPU interpreter (TRITON_INTERPRET,
    read at call time, exactly as `triton.jit` reads it)."""
    return bool(triton.knobs.runtime.interpret)


class Kernel:
    """A `@triton.jit` kernel plus its launch configurations.

    configs: GPU autotuning candidates (`triton.Config`); `None` means the meta-parameters
    are fully given by the caller and the kernel is launched as is. Kernels that write
    their inputs in place must not be autotuned (each trial would apply the update again).
    interpret_meta: constexpr values used instead of autotuning under the interpreter.
    """

    def __init__(self, fn, *, configs: Optional[List[triton.Config]] = None,
                 key: Sequence[str] = (), interpret_meta: Optional[Dict] = None):
        self.jitted = fn  # as decorated at import time (a JITFunction unless TRITON_INTERPRET was set)
        self.fn = fn.fn   # its Python source function
        self.configs = configs
        self.key = list(key)
        self.interpret_meta = dict(interpret_meta or {})
        self._by_mode: Dict[bool, object] = {}

    def _get(self, interp: bool):
        if interp not in self._by_mode:
            if interp:
                kernel = triton.jit(self.fn)  # TRITON_INTERPRET is set: an interpreted function
            else:
                if not isinstance(self.jitted, JITFunction):
                    raise RuntimeError(f"{self.fn.__name__}: triton was imported with TRITON_INTERPRET=1 "
                                       "set, so its kernels can only be interpreted; unset it before "
                                       "importing triton to run them on the GPU")
                kernel = self.jitted
                if self.configs:
                    kernel = triton.autotune(configs=self.configs, key=self.key)(kernel)
            self._by_mode[interp] = kernel
        return self._by_mode[interp]

    def launch(self, grid: Callable[[Dict], tuple], *args, **meta):
        """Run the kernel; `grid(meta)` sees the chosen constexprs (block sizes)."""
        if _compile_only is not None:
            return _compile_only.check(self, args, meta)
        interp = interpreting()
        kernel = self._get(interp)
        if interp:
            # num_warps/num_stages, when given, are ignored by the interpreter
            full = {**self.interpret_meta, **meta} if self.configs else dict(meta)
            with _interpreted_helpers(self.fn):
                return kernel[grid(full)](*args, **full)
        return kernel[grid](*args, **meta)


# ---------------------------------------------------------------------------------------
# Interpreted launches in a process where triton was imported in GPU mode. What this relies on:
#
# 1. The interpreter runs the kernel as Python, resolving the functions it calls through the
#    kernel module's globals (and `tl.` attributes) at run time, and a JITFunction called
#    from Python raises. So, for the duration of the launch, every JITFunction in
#    triton.language's namespace and in the globals of the kernel and of our own jitted
#    helpers (found transitively) is replaced by a copy decorated under the interpreter.
# 2. An interpreted function called from a kernel patches triton.language for the
#    interpreter and never undoes it; the launch undoes only the patches it made itself.
#    tl.sum & co. live in modules that import `triton.language.core`, which stays patched
#    and would break every later GPU compile in the process. So the attributes of
#    `_LANGUAGE` are recorded before the launch and any that changed are put back after it.
#    (Triton 3.6-3.8; tests/ops/test_triton_compile.py checks compiles after interpreted runs.)

_LANGUAGE = (tl, tl.core, tl.math, tl.tensor, tl.dtype)
_interpreted_copies: Dict[Callable, object] = {}


def _interpreted_copy(jitted: JITFunction):
    if jitted.fn not in _interpreted_copies:
        _interpreted_copies[jitted.fn] = triton.jit(jitted.fn)  # TRITON_INTERPRET is set
    return _interpreted_copies[jitted.fn]


def _namespaces_reached(fn) -> List[dict]:
    """Globals of `fn` and of the non-triton jitted functions reachable from them."""
    found: Dict[int, dict] = {}
    todo = [fn]
    while todo:
        namespace = todo.pop().__globals__
        if id(namespace) in found:
            continue
        found[id(namespace)] = namespace
        todo += [v.fn for v in list(namespace.values())
                 if isinstance(v, JITFunction) and not v.fn.__module__.startswith("triton.")]
    return list(found.values())


@contextlib.contextmanager
def _interpreted_helpers(fn):
    namespaces = [vars(tl)] + _namespaces_reached(fn)
    language_before = [(obj, dict(vars(obj))) for obj in _LANGUAGE]
    swapped = []
    try:
        for namespace in namespaces:
            for name, value in list(namespace.items()):
                if isinstance(value, JITFunction):
                    namespace[name] = _interpreted_copy(value)
                    swapped.append((namespace, name, value))
        yield
    finally:
        for namespace, name, value in swapped:
            namespace[name] = value
        for obj, before in language_before:
            now = vars(obj)
            for name, value in before.items():
                if now.get(name) is not value:
                    setattr(obj, name, value)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_poison = False


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised (contiguous) kernel output; NaN/-1-filled inside `poison_outputs()` so a
    test can tell an element the kernel never wrote from one it wrote."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@contextlib.contextmanager
def poison_outputs():
    global _poison
    prev, _poison = _poison, True
    try:
        yield
    finally:
        _poison = prev


# ---------------------------------------------------------------------------------------
# Ahead-of-time compile check: build the GPU binary of every launch without running it.
# Triton compiles for a target GPU architecture without needing the GPU, so the CPU test
# suite can prove every kernel (with every autotune config) compiles for, e.g., sm_90 in
# the dtypes the interpreter cannot check (bf16).

_TYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
               "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
               "bool": "i1"}


class _CompileRecorder:
    def __init__(self, target, all_configs: bool):
        self.target = target
        self.all_configs = all_configs
        self.compiled: List[tuple] = []  # (kernel name, constexprs, shared memory bytes)

    def check(self, kernel: Kernel, args, meta):
        from triton.compiler import ASTSource

        params = list(inspect.signature(kernel.fn).parameters)
        configs = kernel.configs if kernel.configs else [None]
        if not self.all_configs:
            configs = configs[:1]
        for cfg in configs:
            consts = dict(meta)
            if cfg is not None:
                consts.update(cfg.kwargs)
                consts["num_warps"], consts["num_stages"] = cfg.num_warps, cfg.num_stages
            options = {o: consts.pop(o) for o in ("num_warps", "num_stages") if o in consts}
            sig = {}
            for name, val in zip(params, args):
                if hasattr(val, "data_ptr"):
                    sig[name] = "*" + _TYPE_NAMES[str(val.dtype).replace("torch.", "")]
                elif isinstance(val, bool):
                    sig[name] = "i1"
                elif isinstance(val, int):
                    sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
                elif isinstance(val, float):
                    sig[name] = "fp32"
                else:
                    raise TypeError(f"{kernel.fn.__name__}: cannot type argument {name}={val!r}")
            for name in params[len(args):]:
                sig[name] = "constexpr"
            src = ASTSource(kernel.jitted, sig, constexprs={k: consts[k] for k in params[len(args):]})
            binary = triton.compile(src, target=self.target, options=options)
            self.compiled.append((kernel.fn.__name__, consts, binary.metadata.shared))


_compile_only: Optional[_CompileRecorder] = None


class CompileUnavailable(RuntimeError):
    """GPU compiles are impossible in this process (tests/conftest.py reports it as a skip)."""


def compile_unavailable() -> Optional[str]:
    """Why kernels cannot be compiled for a GPU in this process, or None."""
    if isinstance(tl.cdiv, JITFunction):
        return None
    return ("TRITON_INTERPRET=1 was set when triton was imported, so triton.language's and fastrlhf's kernels exist "
            "only as interpreted functions and cannot be compiled for a GPU; run the compile checks without "
            "TRITON_INTERPRET in the environment (the interpreter tests set it per test)")


@contextlib.contextmanager
def compile_only(arch: int = 90, all_configs: bool = False):
    """Within this block, kernel launches compile for CUDA sm_<arch> instead of running.

    Yields a recorder whose `.compiled` lists what was built; outputs are left unwritten.
    Raises CompileUnavailable when this process cannot compile (`compile_unavailable`).
    """
    from triton.backends.compiler import GPUTarget

    why = compile_unavailable()
    if why:
        raise CompileUnavailable(why)
    global _compile_only
    prev, _compile_only = _compile_only, _CompileRecorder(GPUTarget("cuda", arch, 32), all_configs)
    try:
        yield _compile_only
    finally:
        _compile_only = prev
