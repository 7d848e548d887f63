"""The `triton` backend of fastrlhf.ops: the kernels in `fastrlhf.kernels`.

Every op is registered as a `torch.library` custom op in the `fastrlhf_triton` namespace
with a fake (meta) implementation, so torch.compile and CUDA-graph capture see through
them; the functions below check their inputs (clear errors before any launch), fill in
defaults and call `torch.ops.fastrlhf_triton.*`. Signatures and semantics are those of
`fastrlhf.ops.reference`.

The backend runs on CUDA devices, and on the CPU only under TRITON_INTERPRET=1 (the Triton
interpreter, used by the tests). The variable is read at call time, and the kernels are
wrapped for the current mode on first launch (see `fastrlhf.kernels._launch`), so it does
not matter whether triton was imported before the variable was set.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastrlhf.kernels import attention_decode as _decode
from fastrlhf.kernels import attention_prefill as _prefill
from fastrlhf.kernels import kv_cache as _kv
from fastrlhf.kernels import lora as _lora
from fastrlhf.kernels import norms as _norms
from fastrlhf.kernels import rotary as _rotary
from fastrlhf.kernels._launch import interpreting, new_empty

NAMESPACE = "fastrlhf_triton"
# The ops of fastrlhf.ops.OPS this backend does not implement: dispatch resolves calls of them
# as if the backend were unavailable (in the end to the torch reference). Every other op is a
# function below with the reference's signature (tests/ops/test_backend_coverage.py).
FALLBACK_OPS: Tuple[str, ...] = ()


def available(device) -> Tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu":
        if interpreting():
            return True, ""
        return False, "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (tests)"
    return False, f"the triton backend does not support {device.type} tensors"


def _op(name: str, mutates=()):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)


# ---------------------------------------------------------------- attention
# softcap (Gemma2 attention logit softcapping) is None for plain attention; the kernels then
# compile exactly the uncapped code path (a constexpr branch).
@_op("attention_prefill")
def _prefill_op(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], causal: bool,
                scale: float, softcap: Optional[float] = None) -> Tensor:
    return _prefill.attention_prefill(q, k, v, causal=causal, attention_mask=attention_mask, scale=scale,
                                      softcap=softcap)


@_prefill_op.register_fake
def _(q, k, v, attention_mask, causal, scale, softcap=None):
    return q.new_empty(q.shape)


def attention_prefill(q, k, v, *, causal=True, attention_mask=None, scale=None, softcap=None):
    _prefill.check_inputs(q, k, v, attention_mask)
    _prefill.check_softcap(softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _prefill_op(q, k, v, attention_mask, bool(causal), scale,
                       None if softcap is None else float(softcap))


@_op("attention_decode")
def _decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
               cache_starts: Optional[Tensor], scale: float, softcap: Optional[float] = None) -> Tensor:
    return _decode.attention_decode(q, k_cache, v_cache, cache_lens, cache_starts=cache_starts, scale=scale,
                                    softcap=softcap)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lens, cache_starts, scale, softcap=None):
    return q.new_empty(q.shape)


def attention_decode(q, k_cache, v_cache, cache_lens, *, cache_starts=None, scale=None, softcap=None):
    if q.dim() != 3:
        raise ValueError(f"attention_decode expects q [B, Hq, D], got {tuple(q.shape)}")
    _prefill.check_softcap(softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _decode_op(q, k_cache, v_cache, cache_lens, cache_starts, scale,
                      None if softcap is None else float(softcap))


@_op("kv_cache_append", mutates=("k_cache", "v_cache"))
def _append_op(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    _kv.kv_cache_append(k_cache, v_cache, k, v, positions)


@_append_op.register_fake
def _(k_cache, v_cache, k, v, positions):
    return None


def kv_cache_append(k_cache, v_cache, k, v, positions):
    _append_op(k_cache, v_cache, k, v, positions)
    return k_cache, v_cache


# ---------------------------------------------------------------- LoRA
@_op("lora_linear")
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor],
                    lora_b: Optional[Tensor], scaling: float) -> Tuple[Tensor, Tensor]:
    return _lora.lora_linear_forward(x, weight, bias, lora_a, lora_b, scaling)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling):
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    if lora_a is None or lora_b is None or scaling == 0:
        return y, x.new_empty(0)
    return y, x.new_empty(*x.shape[:-1], lora_a.shape[0])


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling = scaling


def _lora_backward(ctx, grad_y, grad_xa):
    # grad_xa is ignored: xa is an internal output kept only for this backward
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    gx, gw, gb, ga, gbb = _lora.lora_linear_backward(grad_y, x, weight, lora_a, lora_b,
                                                     ctx.scaling, xa, needs)
    return gx, gw, gb, ga, gbb, None


_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling):
    """Unmerged LoRA linear; differentiable (backward = the GEMM composition in kernels/lora.py)."""
    return _lora_linear_op(x, weight, bias, lora_a, lora_b, float(scaling))[0]


@_op("lora_fuse", mutates=("out",))
def _fuse_op(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, out: Tensor) -> None:
    _lora.lora_fuse(weight, lora_a, lora_b, scaling, out)


@_fuse_op.register_fake
def _(weight, lora_a, lora_b, scaling, out):
    return None


def lora_fuse(weight, lora_a, lora_b, scaling, *, out=None):
    _lora.check_lora(weight, lora_a, lora_b, "lora_fuse")
    if out is None:
        out = new_empty(weight.shape, weight.dtype, weight.device)
    elif out.shape != weight.shape or out.dtype != weight.dtype:
        raise ValueError(f"lora_fuse: out must match weight's shape/dtype {tuple(weight.shape)}/{weight.dtype}; "
                         f"got {tuple(out.shape)}/{out.dtype}")
    with torch.no_grad():
        _fuse_op(weight, lora_a, lora_b, float(scaling), out)
    return out


def lora_unfuse(weight, lora_a, lora_b, scaling, *, out=None):
    return lora_fuse(weight, lora_a, lora_b, -float(scaling), out=out)


# ---------------------------------------------------------------- norms
@_op("rms_norm")
def _rms_op(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    return _norms.rms_norm(x, weight, eps)


@_rms_op.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_op("rms_norm_residual")
def _rms_res_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    return _norms.rms_norm(x, weight, eps, residual)


@_rms_res_op.register_fake
def _(x, residual, weight, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def rms_norm(x, weight, eps=1e-6, residual=None):
    if residual is None:
        return _rms_op(x, weight, float(eps))
    return _rms_res_op(x, residual, weight, float(eps))


@_op("layer_norm")
def _ln_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return _norms.layer_norm(x, weight, bias, eps)


@_ln_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_op("layer_norm_residual")
def _ln_res_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> Tuple[Tensor, Tensor]:
    return _norms.layer_norm(x, weight, bias, eps, residual)


@_ln_res_op.register_fake
def _(x, residual, weight, bias, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    if residual is None:
        return _ln_op(x, weight, bias, float(eps))
    return _ln_res_op(x, residual, weight, bias, float(eps))


# ---------------------------------------------------------------- rotary
@_op("rotary", mutates=("q", "k"))
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, rotary_dim: int) -> None:
    _rotary.rotary(q, k, cos, sin, positions, rotary_dim=rotary_dim)


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, rotary_dim):
    return None


def rotary(q, k, cos, sin, positions, *, rotary_dim=None):
    rd = q.shape[-1] if rotary_dim is None else int(rotary_dim)
    _rotary_op(q, k, cos, sin, positions, rd)
    return q, k
