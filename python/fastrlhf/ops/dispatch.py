"""Backend selection for the ops layer.

Backends: `torch` (reference, always there), `triton` (fastrlhf.kernels) and `cuda`
(csrc/, JIT-built). A backend is a module exposing `available(device) -> (ok, reason)`,
`FALLBACK_OPS` (the ops of `fastrlhf.ops.OPS` it does not implement; calls of those resolve
as if the backend were unavailable) and one function per other op, with the reference's
signature (tests/ops/test_backend_coverage.py holds every backend to this).

Selection order for a call: the `backend=` argument, else `set_backend(...)` / the config,
else the `FASTRLHF_BACKEND` environment variable, else `auto`. `auto` picks, per op and
device, the fastest backend recorded in the per-device table (written by
benchmarks/kernels.py) or else cuda > triton > torch, among those that are available for
the tensors' device. Asking for an unavailable backend warns once, naming the reason, and
falls back to `auto`; it never crashes the run.

The per-device tables are package data (`fastrlhf/ops/tables/<device slug>.json`, see
`fastrlhf.ops.tables`), read through importlib.resources so that they load from a wheel as
well as from a source checkout.
"""
from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import pathlib
import re
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
_MODULES = {
    "torch": "fastrlhf.ops.reference",
    "triton": "fastrlhf.ops.triton_backend",
    "cuda": "fastrlhf.ops.cuda_backend",
}
_global_backend: Optional[str] = None
_warned: set = set()
_loaded: Dict[str, object] = {}
# op -> ordered backend preference, filled from the per-device table when one exists
_preference: Dict[str, Tuple[str, ...]] = {}


class BackendError(ValueError):
    """An unknown backend name (argument, config or FASTRLHF_BACKEND); the message lists the valid ones."""


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (`None` returns to env/auto)."""
    global _global_backend
    if name is not None and name not in BACKENDS:
        raise BackendError(f"unknown ops backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _global_backend = name


def get_backend() -> str:
    """The backend setting in force: set_backend's, else FASTRLHF_BACKEND (case and spaces ignored),
    else 'auto'."""
    if _global_backend:
        return _global_backend
    raw = os.environ.get("FASTRLHF_BACKEND", "")
    name = raw.strip().lower() or "auto"
    if name not in BACKENDS:
        raise BackendError(f"FASTRLHF_BACKEND={raw!r} is not a kernel backend; set it to one of "
                           f"{', '.join(BACKENDS)}, or unset it (auto)")
    return name


def set_preference(op: str, order: Tuple[str, ...]) -> None:
    """Record which backend `auto` should try first for `op` (from a benchmark table)."""
    _preference[op] = tuple(order)


def device_slug(name: str) -> str:
    """File-name form of a device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


TABLES_PACKAGE = "fastrlhf.ops.tables"  # holds <device slug>.json, shipped as package data
_tables_loaded: Dict[str, bool] = {}


def device_table(device_name: str):
    """The packaged preference table of a device (an importlib.resources Traversable, which
    may not exist): TABLES_PACKAGE/<device slug>.json."""
    return importlib.resources.files(TABLES_PACKAGE) / f"{device_slug(device_name)}.json"


def load_device_table(device: torch.device, path: Optional[str] = None) -> bool:
    """Load the benchmark-written preference table of a CUDA device, if one ships (or the
    table file `path`). Returns whether a table was loaded; each source is read once.

    A table is {"device": ..., "date": ..., "ops": {op: [fastest backend, ..., slowest]}}.
    """
    if path is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        source = device_table(torch.cuda.get_device_name(device))
    else:
        source = pathlib.Path(path)  # the same is_file/read_text as a Traversable
    key = str(source)
    if key not in _tables_loaded:
        _tables_loaded[key] = _read_table(source)
    return _tables_loaded[key]


def _read_table(source) -> bool:
    if not source.is_file():
        return False
    try:
        table = json.loads(source.read_text())
        for op, order in table.get("ops", {}).items():
            order = [b for b in order if b in _MODULES]
            if order:
                set_preference(op, tuple(order) + tuple(b for b in ("cuda", "triton", "torch") if b not in order))
    except (OSError, ValueError, AttributeError) as e:
        _warn_once(str(source), f"fastrlhf.ops: ignoring unreadable backend table {source}: {e}")
        return False
    return True


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _load(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as e:  # a backend that fails to import is just unavailable
            _loaded[name] = e
    return _loaded[name]


def backend_status(name: str, device: torch.device) -> Tuple[bool, str]:
    """(available, reason) of backend `name` for tensors on `device`."""
    mod = _load(name)
    if isinstance(mod, Exception):
        return False, f"{name} backend failed to import: {mod}"
    avail = getattr(mod, "available", None)
    if avail is None:
        return True, ""
    return avail(device)


def _impl(name: str, op: str, device: torch.device) -> Tuple[Optional[Callable], str]:
    ok, why = backend_status(name, device)
    if not ok:
        return None, why
    mod = _load(name)
    fn = getattr(mod, op, None)
    if fn is None or op in getattr(mod, "FALLBACK_OPS", ()):
        return None, f"the {name} backend does not implement {op}"
    return fn, ""


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> Tuple[str, Callable]:
    """Return (backend name, function) that will run `op` for tensors on `device`."""
    want = backend or get_backend()
    if want not in BACKENDS:
        raise BackendError(f"unknown ops backend {want!r}; choose one of {', '.join(BACKENDS)}")
    if want != "auto":
        fn, why = _impl(want, op, device)
        if fn is not None:
            return want, fn
        _warn_once(f"{want}:{op}:{device.type}",
                   f"fastrlhf.ops: backend {want!r} unavailable for {op} on {device.type} "
                   f"({why}); falling back to auto")
    if device.type == "cuda":
        load_device_table(device)
    order = _preference.get(op, ("cuda", "triton", "torch"))
    for name in order:
        if name != "torch" and device.type != "cuda":
            continue  # GPU backends only run implicitly on GPU tensors
        fn, _ = _impl(name, op, device)
        if fn is not None:
            return name, fn
    return "torch", getattr(_load("torch"), op)
