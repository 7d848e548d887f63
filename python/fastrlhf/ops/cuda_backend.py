"""The `cuda` backend of fastrlhf.ops: the hand-written kernels in csrc/.

The extension is JIT-built on first use (`fastrlhf.ops.cuda_build`) and registers its ops
in C++ (`TORCH_LIBRARY(fastrlhf_cuda, ...)`); this module adds their fake (meta)
implementations, so torch.compile and CUDA-graph capture see through them, and exposes
one function per op with the reference's signature.

Calls the kernels do not cover (float32 prefill, head dims that are not compiled, mixed
dtypes; attention with softcap, alibi_slopes, a prefill window or packed cu_seqlens) go to
the triton backend when it is available, else to the torch reference, with a one-time
warning naming the reason: asking for the cuda backend never makes a call fail that the
reference would accept. A decode window runs in the csrc kernel as raised cache starts.

The csrc/ kernels are forward-only (their ops have no autograd formula, so a gradient would
silently stop at them). A call that needs gradients (grad mode on and an input that requires
grad) therefore runs where a backward exists: the triton backend when it is usable on the
device (Triton backward kernels for attention_prefill and the norms), else the torch
reference. `backward_of(op, device)` says which; `fastrlhf ops` prints it.
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import Optional, Tuple

import torch

from . import cuda_build
from . import paged_reference as _paged_ref
from .attention_args import check_window
from . import reference as _reference

NAMESPACE = "fastrlhf_cuda"
# The ops of fastrlhf.ops.OPS this backend does not implement: dispatch resolves calls of them
# as if the backend were unavailable (triton, in the end the torch reference). Every other op
# is a function below with the reference's signature (tests/ops/test_backend_coverage.py);
# its calls that no kernel covers are handed on one by one (`_fallback`; module docstring).
FALLBACK_OPS: Tuple[str, ...] = ("token_logprobs",  # no CUDA kernel: auto picks triton
                                 "paged_attention_prefill",  # likewise (kernels/paged_attention.py)
                                 "fused_moe")  # likewise (kernels/fused_moe.py)
# arguments of implemented ops that the csrc kernels lack: calls using them are handed on
# (`_fallback`), listed by `fastrlhf ops`. A decode `window` runs in csrc (as raised cache starts).
ARGUMENTS_HANDED_ON = {"attention_prefill": ("softcap", "window", "alibi_slopes", "cu_seqlens"),
                       "attention_decode": ("softcap", "alibi_slopes")}
# the torch.library ops that csrc/ops.cpp registers (the kernels behind the functions below)
OP_NAMES = ("attention_decode", "attention_prefill", "lora_linear", "lora_fuse", "lora_fuse_out", "rms_norm",
            "rms_norm_residual", "layer_norm", "layer_norm_residual", "rotary_", "kv_cache_append_",
            "paged_attention_decode", "paged_kv_append_")
PREFILL_HEAD_DIMS = (64, 80, 96, 128)  # instantiated in csrc/attention_prefill.cu
_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)

_lock = threading.Lock()
_fakes_registered = False
_warned: set = set()


def load_extension() -> Tuple[bool, str]:
    """Build/load the extension once and register the fake implementations."""
    global _fakes_registered
    ok, why = cuda_build.ensure_loaded()
    if ok and not _fakes_registered:
        with _lock:
            if not _fakes_registered:
                _register_fakes()
                _fakes_registered = True
    return ok, why


def available(device) -> Tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, "the cuda backend runs only on CUDA tensors"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    return load_extension()


def _ops():
    return getattr(torch.ops, NAMESPACE)


# ---------------------------------------------------------------- fake implementations
def _register_fakes() -> None:
    reg = torch.library.register_fake
    ns = NAMESPACE

    @reg(f"{ns}::attention_decode")
    def _(q, k_cache, v_cache, cache_lens, cache_starts, scale):
        return q.new_empty(q.shape)

    @reg(f"{ns}::attention_prefill")
    def _(q, k, v, causal, attention_mask, scale):
        return q.new_empty(q.shape)

    @reg(f"{ns}::lora_linear")
    def _(x, weight, bias, lora_a, lora_b, scaling):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @reg(f"{ns}::lora_fuse")
    def _(weight, lora_a, lora_b, scaling):
        return weight.new_empty(weight.shape)

    @reg(f"{ns}::lora_fuse_out")
    def _(weight, lora_a, lora_b, scaling, out):
        return None

    @reg(f"{ns}::rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @reg(f"{ns}::rms_norm_residual")
    def _(x, weight, eps, residual):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @reg(f"{ns}::layer_norm")
    def _(x, weight, bias, eps):
        return x.new_empty(x.shape)

    @reg(f"{ns}::layer_norm_residual")
    def _(x, weight, bias, eps, residual):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @reg(f"{ns}::rotary_")
    def _(q, k, cos, sin, positions, rotary_dim):
        return None

    @reg(f"{ns}::kv_cache_append_")
    def _(k_cache, v_cache, k, v, positions):
        return None

    @reg(f"{ns}::paged_attention_decode")
    def _(q, k_pool, v_pool, block_tables, seq_lens, alibi_slopes, scale, softcap, window):
        return q.new_empty(q.shape)

    @reg(f"{ns}::paged_kv_append_")
    def _(k_pool, v_pool, k, v, slot_mapping):
        return None


# ---------------------------------------------------------------- fallback for uncovered calls
def _triton_module(device: torch.device):
    """The triton backend module when it is usable on `device`, else None."""
    try:
        from . import dispatch
        ok, _ = dispatch.backend_status("triton", device)
        mod = dispatch._load("triton")
        if ok and not isinstance(mod, Exception):
            return mod
    except Exception:  # any trouble with triton: the reference is always right
        pass
    return None


def _triton_or_reference(op: str, device: torch.device):
    mod = _triton_module(device)
    if mod is not None and hasattr(mod, op) and op not in getattr(mod, "FALLBACK_OPS", ()):
        return getattr(mod, op)
    return getattr(_reference, op)


def _fallback(op: str, device: torch.device, reason: str):
    """The triton implementation of `op` when usable, else the torch reference."""
    fn = _triton_or_reference(op, device)
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        where = getattr(fn, "__module__", "?").rsplit(".", 1)[-1]
        warnings.warn(f"fastrlhf.ops cuda backend: {op} {reason}; using {where}", RuntimeWarning, stacklevel=3)
    return fn


# ---------------------------------------------------------------- calls that need gradients
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _differentiable(op: str, device: torch.device, triton_ok: bool = True):
    """What runs a call of `op` that needs gradients: the triton backend (its backward kernels)
    when usable on `device` and `triton_ok` (the call is within the triton kernels' limits),
    else the torch reference (autograd)."""
    return _triton_or_reference(op, device) if triton_ok else getattr(_reference, op)


def backward_of(op: str, device) -> str:
    """Where the backward of `op` runs when the cuda backend is asked for it (`fastrlhf ops`)."""
    device = torch.device(device)
    mod = _triton_module(device)
    if mod is not None and hasattr(mod, "backward_of") and op not in getattr(mod, "FALLBACK_OPS", ()):
        return "triton backend: " + mod.backward_of(op, device)
    if op in ("kv_cache_append", "lora_fuse", "lora_unfuse", "paged_kv_append"):
        return "none (writes in place)"
    return "torch reference (triton unavailable here)"


_VEC = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4}  # elements per 16-byte load


# ---------------------------------------------------------------- ops
def _extra(**kwargs):
    """The optional attention arguments that are set (passed on only then)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def attention_prefill(q, k, v, *, causal=True, attention_mask=None, scale=None, softcap=None, window=None,
                      alibi_slopes=None, cu_seqlens=None):
    extra = _extra(softcap=softcap, window=window, alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens)
    if _needs_grad(q, k, v):
        triton_ok = q.shape[-1] <= 256 and q.dtype in _FLOAT and k.dtype == v.dtype == q.dtype
        return _differentiable("attention_prefill", q.device, triton_ok)(
            q, k, v, causal=causal, attention_mask=attention_mask, scale=scale, **extra)
    d = q.shape[-1]
    why = None
    handed_on = [a for a in ARGUMENTS_HANDED_ON["attention_prefill"] if a in extra]
    if handed_on:
        return _fallback("attention_prefill", q.device, f"has no {' / '.join(handed_on)} kernel")(
            q, k, v, causal=causal, attention_mask=attention_mask, scale=scale, **extra)
    if q.dtype not in _HALF:
        why = f"has no {q.dtype} kernel (float16/bfloat16 only)"
    elif k.dtype != q.dtype or v.dtype != q.dtype:
        why = "needs q, k and v in one dtype"
    elif d not in PREFILL_HEAD_DIMS:
        why = f"has no kernel for head dim {d} (compiled: {PREFILL_HEAD_DIMS})"
    if why:
        return _fallback("attention_prefill", q.device, why)(
            q, k, v, causal=causal, attention_mask=attention_mask, scale=scale)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _ops().attention_prefill(q, k, v, bool(causal), attention_mask, scale)


def _window_starts(cache_lens, cache_starts, window):
    """A decode window as cache starts: the query (column len - 1) sees columns > len - 1 - window,
    i.e. from max(start, len - window); the csrc kernel then runs windowed calls unchanged."""
    lens = cache_lens.long()
    first = lens - window
    return first.clamp_min(0) if cache_starts is None else torch.maximum(cache_starts.to(lens.device).long(), first)


def attention_decode(q, k_cache, v_cache, cache_lens, *, cache_starts=None, scale=None, softcap=None,
                     window=None, alibi_slopes=None):
    extra = _extra(softcap=softcap, window=window, alibi_slopes=alibi_slopes)
    if _needs_grad(q, k_cache, v_cache):
        return _differentiable("attention_decode", q.device)(
            q, k_cache, v_cache, cache_lens, cache_starts=cache_starts, scale=scale, **extra)
    d = q.shape[-1]
    why = None
    handed_on = [a for a in ARGUMENTS_HANDED_ON["attention_decode"] if a in extra]
    if handed_on:
        return _fallback("attention_decode", q.device, f"has no {' / '.join(handed_on)} kernel")(
            q, k_cache, v_cache, cache_lens, cache_starts=cache_starts, scale=scale, **extra)
    if q.dtype not in _FLOAT or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        why = "needs q and the caches in one of float16/bfloat16/float32"
    elif d % _VEC[q.dtype] or d > 32 * _VEC[q.dtype]:
        why = f"has no kernel for head dim {d} in {q.dtype}"
    if why:
        return _fallback("attention_decode", q.device, why)(
            q, k_cache, v_cache, cache_lens, cache_starts=cache_starts, scale=scale, **extra)
    if window is not None:
        cache_starts = _window_starts(cache_lens.to(q.device), cache_starts, check_window(window))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _ops().attention_decode(q, k_cache, v_cache, cache_lens, cache_starts, scale)


def kv_cache_append(k_cache, v_cache, k, v, positions):
    if k_cache.dtype not in _FLOAT:
        return _fallback("kv_cache_append", k_cache.device, f"has no {k_cache.dtype} kernel")(
            k_cache, v_cache, k, v, positions)
    _ops().kv_cache_append_(k_cache, v_cache, k, v, positions)
    return k_cache, v_cache


def lora_linear(x, weight, bias, lora_a, lora_b, scaling):
    tensors = [t for t in (x, weight, bias, lora_a, lora_b) if t is not None]
    why = None
    if _needs_grad(*tensors):  # the fused kernel is for generation
        return _differentiable("lora_linear", x.device)(x, weight, bias, lora_a, lora_b, scaling)
    if x.dtype not in _FLOAT or any(t.dtype != x.dtype for t in tensors):
        why = "needs x, weight, bias and LoRA factors in one floating dtype"
    if why:
        return _fallback("lora_linear", x.device, why)(x, weight, bias, lora_a, lora_b, scaling)
    if lora_a is None or lora_b is None:
        lora_a = lora_b = None
    return _ops().lora_linear(x, weight, bias, lora_a, lora_b, float(scaling))


def lora_fuse(weight, lora_a, lora_b, scaling, *, out=None):
    if weight.dtype not in _FLOAT:
        return _fallback("lora_fuse", weight.device, f"has no {weight.dtype} kernel")(
            weight, lora_a, lora_b, scaling, out=out)
    if out is None:
        return _ops().lora_fuse(weight, lora_a, lora_b, float(scaling))
    _ops().lora_fuse_out(weight, lora_a, lora_b, float(scaling), out)
    return out


def lora_unfuse(weight, lora_a, lora_b, scaling, *, out=None):
    return lora_fuse(weight, lora_a, lora_b, -scaling, out=out)


def _norm_params_ok(x, *params) -> Optional[str]:
    if x.dtype not in _FLOAT:
        return f"has no {x.dtype} kernel"
    dts = {p.dtype for p in params if p is not None}
    if len(dts) > 1 or (dts and dts.pop() not in (x.dtype, torch.float32)):
        return "needs weight/bias in float32 or x's dtype (and both the same)"
    return None


def rms_norm(x, weight, eps=1e-6, residual=None):
    if _needs_grad(x, weight, residual):
        return _differentiable("rms_norm", x.device, x.shape[-1] <= 65536)(x, weight, eps, residual)
    why = _norm_params_ok(x, weight) or (
        "needs residual in x's dtype" if residual is not None and residual.dtype != x.dtype else None)
    if why:
        return _fallback("rms_norm", x.device, why)(x, weight, eps, residual)
    if residual is None:
        return _ops().rms_norm(x, weight, float(eps))
    y, h = _ops().rms_norm_residual(x, weight, float(eps), residual)
    return y, h


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    if _needs_grad(x, weight, bias, residual):
        return _differentiable("layer_norm", x.device, x.shape[-1] <= 65536)(x, weight, bias, eps, residual)
    why = _norm_params_ok(x, weight, bias) or (
        "needs residual in x's dtype" if residual is not None and residual.dtype != x.dtype else None)
    if why:
        return _fallback("layer_norm", x.device, why)(x, weight, bias, eps, residual)
    if residual is None:
        return _ops().layer_norm(x, weight, bias, float(eps))
    y, h = _ops().layer_norm_residual(x, weight, bias, float(eps), residual)
    return y, h


def rotary(q, k, cos, sin, positions, *, rotary_dim=None):
    if _needs_grad(q, k):
        return _differentiable("rotary", q.device)(q, k, cos, sin, positions, rotary_dim=rotary_dim)
    if q.dtype not in _FLOAT or k.dtype != q.dtype:
        return _fallback("rotary", q.device, "needs q and k in one floating dtype")(
            q, k, cos, sin, positions, rotary_dim=rotary_dim)
    _ops().rotary_(q, k, cos, sin, positions, -1 if rotary_dim is None else int(rotary_dim))
    return q, k


# ---------------------------------------------------------------- paged KV cache (csrc/paged_*.cu)
# paged_attention_prefill has no CUDA kernel (FALLBACK_OPS: auto runs triton's on a GPU).
def _pool_vector_friendly(pool: torch.Tensor) -> Optional[str]:
    """Why the csrc/ kernels' 16-byte loads cannot address `pool`, or None. Strides and the
    storage offset only (no data_ptr), so this also runs on torch.compile's fake tensors; the
    caching allocator aligns every storage to far more than 16 bytes."""
    vec = _VEC.get(pool.dtype)
    if vec is None:
        return f"has no {pool.dtype} kernel"
    if pool.shape[-1] % vec or pool.shape[-1] > 32 * vec:
        return f"has no kernel for head dim {pool.shape[-1]} in {pool.dtype}"
    if pool.stride(-1) != 1 or pool.storage_offset() % vec or \
            any(st % vec for st, n in zip(pool.stride()[:-1], pool.shape[:-1]) if n > 1):
        return "needs pools with a contiguous, 16-byte aligned last dim"
    return None


def paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, *, scale=None, softcap=None, window=None,
                           alibi_slopes=None):
    kw = dict(scale=scale, softcap=softcap, window=window, alibi_slopes=alibi_slopes)
    if _needs_grad(q, k_pool, v_pool):
        return _differentiable("paged_attention_decode", q.device)(q, k_pool, v_pool, block_tables, seq_lens, **kw)
    _paged_ref.check_attention("paged_attention_decode", q, k_pool, v_pool, block_tables, seq_lens, softcap, window,
                               alibi_slopes)
    if seq_lens.shape[0] != q.shape[0]:
        raise ValueError(f"paged_attention_decode: seq_lens has {seq_lens.shape[0]} entries for {q.shape[0]} queries")
    why = _pool_vector_friendly(k_pool) or _pool_vector_friendly(v_pool)
    if why:
        return _fallback("paged_attention_decode", q.device, why)(q, k_pool, v_pool, block_tables, seq_lens, **kw)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ops().paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, alibi_slopes, scale,
                                         0.0 if softcap is None else float(softcap),
                                         0 if window is None else int(window))


def paged_kv_append(k_pool, v_pool, k, v, slot_mapping):
    _paged_ref.check_append(k_pool, v_pool, k, v, slot_mapping)
    why = _pool_vector_friendly(k_pool) or _pool_vector_friendly(v_pool)
    if why:
        return _fallback("paged_kv_append", k_pool.device, why)(k_pool, v_pool, k, v, slot_mapping)
    _ops().paged_kv_append_(k_pool, v_pool, k, v, slot_mapping)
    return k_pool, v_pool
