"""How every kernel in fastrlhf.kernels is launched.

Triton decides at decoration time whether a `@triton.jit` function is compiled for the GPU
or run by the CPU interpreter (TRITON_INTERPRET=1). Our kernel modules may be imported
before a test sets that variable, so kernels are written as plain functions and wrapped
here, lazily and per mode, when they are first launched:

- GPU: `triton.jit`, optionally under `triton.autotune` over the given configs;
- interpreter: one small config (the interpreter runs every program in Python, so fewer,
  larger tiles are much faster and autotuning would only multiply the run time).

Kernels must not call jitted helpers of their own (each would need the same per-mode
wrapping); they are short enough to be written out in full. Triton's own jitted library
functions (tl.sum, tl.max, tl.cdiv, tl.zeros, ...) are decided when triton is imported; if
that happened outside interpreter mode, `_interpreted_stdlib` swaps interpreted copies in
for the duration of an interpreted launch, so the mode really is chosen per call.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class Kernel:
    """A Triton kernel source plus its launch configurations.

    configs: GPU autotuning candidates (`triton.Config`); `None` means the meta-parameters
    are fully given by the caller and the kernel is launched as is. Kernels that write
    their inputs in place must not be autotuned (each trial would apply the update again).
    interpret_meta: constexpr values used instead of autotuning under the interpreter.
    """

    def __init__(self, fn: Callable, *, configs: Optional[List[triton.Config]] = None,
                 key: Sequence[str] = (), interpret_meta: Optional[Dict] = None):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.interpret_meta = dict(interpret_meta or {})
        self._compiled: Dict[bool, object] = {}

    def _get(self, interp: bool):
        if interp not in self._compiled:
            if interp:
                from triton.runtime.interpreter import InterpretedFunction
                self._compiled[interp] = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction
                jf = JITFunction(self.fn)
                if self.configs:
                    jf = triton.autotune(configs=self.configs, key=self.key)(jf)
                self._compiled[interp] = jf
        return self._compiled[interp]

    def launch(self, grid: Callable[[Dict], tuple], *args, **meta):
        """Run the kernel; `grid(meta)` sees the chosen constexprs (block sizes)."""
        if _compile_only is not None:
            return _compile_only.check(self, args, meta)
        interp = interpreting()
        fn = self._get(interp)
        if interp:
            full = {**self.interpret_meta, **meta} if self.configs else dict(meta)
            full.pop("num_warps", None)
            full.pop("num_stages", None)
            with _interpreted_stdlib():
                return fn[grid(full)](*args, **full)
        return fn[grid](*args, **meta)


_stdlib_copies: Dict[str, object] = {}


def _scoped_interpreted(fn):
    """An interpreted copy of a triton library function that undoes its language patches.

    Triton's InterpretedFunction, called as a device function, patches triton.language for
    the interpreter and never restores it; with a compiled-mode triton that would break
    every later GPU compile in the process. This copy restores the patches on return.
    """
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang

    class _Scoped(InterpretedFunction):
        def __call__(self, *args, **kwargs):
            scope = _patch_lang(self.fn)
            try:
                return self.rewrite()(*args, **kwargs)
            finally:
                scope.restore()

    return _Scoped(fn)


@contextlib.contextmanager
def _interpreted_stdlib():
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    compiled = {n: f for n, f in vars(tl).items() if isinstance(f, JITFunction)}
    if not compiled:  # triton was imported in interpreter mode: nothing to swap
        yield
        return
    for name, f in compiled.items():
        if name not in _stdlib_copies:
            _stdlib_copies[name] = _scoped_interpreted(f.fn)
        setattr(tl, name, _stdlib_copies[name])
    try:
        yield
    finally:
        for name, f in compiled.items():
            setattr(tl, name, f)


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
        from triton.runtime.jit import JITFunction

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
            src = ASTSource(JITFunction(kernel.fn), sig, constexprs={k: consts[k] for k in params[len(args):]})
            binary = triton.compile(src, target=self.target, options=options)
            self.compiled.append((kernel.fn.__name__, consts, binary.metadata.shared))


_compile_only: Optional[_CompileRecorder] = None


@contextlib.contextmanager
def compile_only(arch: int = 90, all_configs: bool = False):
    """Within this block, kernel launches compile for CUDA sm_<arch> instead of running.

    Yields a recorder whose `.compiled` lists what was built; outputs are left unwritten.
    """
    from triton.backends.compiler import GPUTarget

    global _compile_only
    prev, _compile_only = _compile_only, _CompileRecorder(GPUTarget("cuda", arch, 32), all_configs)
    try:
        yield _compile_only
    finally:
        _compile_only = prev
