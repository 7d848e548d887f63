"""How every kernel in fastrlhf.kernels is launched.

Triton decides at decoration time whether a `@triton.jit` function is compiled for the GPU
or run by the CPU interpreter (TRITON_INTERPRET=1). Our kernel modules may be imported
before a test sets that variable, so kernels are written as plain functions and wrapped
here, lazily and per mode, when they are first launched:

- GPU: `triton.jit`, optionally under `triton.autotune` over the given configs;
- interpreter: one small config (the interpreter runs every program in Python, so fewer,
  larger tiles are much faster and autotuning would only multiply the run time).

Kernels must not call other jitted helpers (each would need the same per-mode wrapping);
they are short enough to be written out in full.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

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
        interp = interpreting()
        fn = self._get(interp)
        if interp:
            full = {**self.interpret_meta, **meta} if self.configs else dict(meta)
            full.pop("num_warps", None)
            full.pop("num_stages", None)
            return fn[grid(full)](*args, **full)
        return fn[grid](*args, **meta)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
