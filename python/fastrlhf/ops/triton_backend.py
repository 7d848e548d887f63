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
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastrlhf.kernels import attention_backward as _attn_bwd
from fastrlhf.kernels import attention_decode as _decode
from fastrlhf.kernels import attention_prefill as _prefill
from fastrlhf.kernels import fused_moe as _moe
from fastrlhf.kernels import kv_cache as _kv
from fastrlhf.kernels import lora as _lora
from fastrlhf.kernels import norms as _norms
from fastrlhf.kernels import paged_attention as _paged
from fastrlhf.kernels import rotary as _rotary
from fastrlhf.kernels import token_logprobs as _tlp
from fastrlhf.kernels._launch import interpreting, new_empty

from fastrlhf.ops import attention_args as _args
from fastrlhf.ops import paged_reference as _paged_ref
from fastrlhf.ops import reference as _reference

NAMESPACE = "fastrlhf_triton"
# The ops of fastrlhf.ops.OPS this backend does not implement: dispatch resolves calls of them
# as if the backend were unavailable (in the end to the torch reference). Every other op is a
# function below with the reference's signature (tests/ops/test_backend_coverage.py).
FALLBACK_OPS: Tuple[str, ...] = ()
# Where the backward of each op runs when a call needs gradients (`fastrlhf ops` prints this).
# Ops without a kernel backward that are differentiable in the reference (attention_decode,
# rotary) run such calls on the reference; the in-place writers have no gradient.
BACKWARD = {
    "attention_prefill": "triton kernels (kernels/attention_backward.py)",
    "rms_norm": "triton kernel (kernels/norms.py)",
    "layer_norm": "triton kernel (kernels/norms.py)",
    "lora_linear": "GEMMs (kernels/lora.py)",
    "token_logprobs": "triton kernel and GEMMs, recomputing the logits chunk by chunk (kernels/token_logprobs.py)",
    "attention_decode": "torch reference (calls that need gradients run on it)",
    "rotary": "torch reference (calls that need gradients run on it)",
    "fused_moe": "torch reference (calls that need gradients run on it)",
    "kv_cache_append": "none (writes caches in place)",
    "lora_fuse": "none (writes weights in place)",
    "lora_unfuse": "none (writes weights in place)",
    "paged_attention_decode": "torch reference (calls that need gradients run on it)",
    "paged_attention_prefill": "torch reference (calls that need gradients run on it)",
    "paged_kv_append": "none (writes the pools in place)",
}


def backward_of(op: str, device) -> str:
    """Where the backward of `op` runs on this backend (for `fastrlhf ops`)."""
    return BACKWARD.get(op, "none")


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


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _op(name: str, mutates=()):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)


# ---------------------------------------------------------------- attention
# softcap (Gemma2 attention logit softcapping), window (sliding window), alibi_slopes (ALiBi) and
# seq_bounds (packed sequences: each token's [start, end) of its sequence, int32 [2, T], derived
# from cu_seqlens by the wrapper) are None for plain attention; the kernels then compile exactly
# the plain code path (constexpr branches).
# The op returns (out, lse): lse, the per-row logsumexp the backward recomputes from, is written
# only when `need_lse` (a call that will be differentiated) and is otherwise an empty tensor.
@_op("attention_prefill")
def _prefill_op(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], causal: bool,
                scale: float, softcap: Optional[float] = None, need_lse: bool = False,
                window: Optional[int] = None, alibi_slopes: Optional[Tensor] = None,
                seq_bounds: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    kw = dict(causal=causal, attention_mask=attention_mask, scale=scale, softcap=softcap, window=window,
              alibi_slopes=alibi_slopes, seq_bounds=seq_bounds)
    if need_lse:
        return _prefill.attention_prefill(q, k, v, return_lse=True, **kw)
    return _prefill.attention_prefill(q, k, v, **kw), q.new_empty(0, dtype=torch.float32)


@_prefill_op.register_fake
def _(q, k, v, attention_mask, causal, scale, softcap=None, need_lse=False, window=None, alibi_slopes=None,
      seq_bounds=None):
    lse_shape = q.shape[:3] if need_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@_op("attention_prefill_backward")
def _prefill_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    attention_mask: Optional[Tensor], causal: bool, scale: float,
                    softcap: Optional[float] = None, window: Optional[int] = None,
                    alibi_slopes: Optional[Tensor] = None,
                    seq_bounds: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return _attn_bwd.attention_backward(grad_out, q, k, v, out, lse, causal=causal,
                                        attention_mask=attention_mask, scale=scale, softcap=softcap,
                                        window=window, alibi_slopes=alibi_slopes, seq_bounds=seq_bounds)


@_prefill_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, attention_mask, causal, scale, softcap=None, window=None, alibi_slopes=None,
      seq_bounds=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _prefill_setup(ctx, inputs, output):
    q, k, v, attention_mask, causal, scale, softcap, _, window, alibi_slopes, seq_bounds = inputs
    ctx.save_for_backward(q, k, v, attention_mask, alibi_slopes, seq_bounds, *output)
    ctx.causal, ctx.scale, ctx.softcap, ctx.window = causal, scale, softcap, window


def _prefill_backward(ctx, grad_out, grad_lse):
    # grad_lse is ignored: lse is an internal output kept only for this backward
    q, k, v, attention_mask, alibi_slopes, seq_bounds, out, lse = ctx.saved_tensors
    if lse.numel() != q.shape[0] * q.shape[1] * q.shape[2]:
        raise RuntimeError("attention_prefill (triton): backward of a call made without gradients enabled "
                           "(no logsumexp was saved); run the forward with torch.enable_grad()")
    dq, dk, dv = _prefill_bwd_op(grad_out, q, k, v, out, lse, attention_mask, ctx.causal, ctx.scale, ctx.softcap,
                                 ctx.window, alibi_slopes, seq_bounds)
    return (dq, dk, dv) + (None,) * 8


_prefill_op.register_autograd(_prefill_backward, setup_context=_prefill_setup)


def _attention_rules(q, window, alibi_slopes, key_span: int):
    """Checked window / alibi_slopes in the form the kernels take: a window that hides no key
    (>= key_span) is dropped (the plain kernel computes the same), slopes are fp32 constants."""
    window = _args.check_window(window)
    _args.check_alibi(alibi_slopes, q.shape[1], q.device)
    if alibi_slopes is not None:
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes are constants (the triton kernels compute no gradient for them); "
                             "pass alibi_slopes.detach()")
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    if window is not None and window >= key_span:
        window = None
    return window, alibi_slopes


def attention_prefill(q, k, v, *, causal=True, attention_mask=None, scale=None, softcap=None, window=None,
                      alibi_slopes=None, cu_seqlens=None):
    """Differentiable in q, k, v (FlashAttention-2-style backward, kernels/attention_backward.py)."""
    _prefill.check_inputs(q, k, v, attention_mask)
    _prefill.check_softcap(softcap)
    _args.check_causal_window(causal, _args.check_window(window))
    _args.check_packed(q, k, attention_mask, cu_seqlens)
    window, alibi_slopes = _attention_rules(q, window, alibi_slopes, k.shape[2])
    seq_bounds = None
    if cu_seqlens is not None:
        seq_bounds = torch.stack(_args.packed_key_ranges(cu_seqlens, q.shape[2]))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _prefill_op(q, k, v, attention_mask, bool(causal), scale,
                       None if softcap is None else float(softcap), _needs_grad(q, k, v),
                       window, alibi_slopes, seq_bounds)[0]


@_op("attention_decode")
def _decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
               cache_starts: Optional[Tensor], scale: float, softcap: Optional[float] = None,
               window: Optional[int] = None, alibi_slopes: Optional[Tensor] = None) -> Tensor:
    return _decode.attention_decode(q, k_cache, v_cache, cache_lens, cache_starts=cache_starts, scale=scale,
                                    softcap=softcap, window=window, alibi_slopes=alibi_slopes)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lens, cache_starts, scale, softcap=None, window=None, alibi_slopes=None):
    return q.new_empty(q.shape)


def attention_decode(q, k_cache, v_cache, cache_lens, *, cache_starts=None, scale=None, softcap=None,
                     window=None, alibi_slopes=None):
    if _needs_grad(q, k_cache, v_cache):  # no backward kernel: the reference is differentiable
        return _reference.attention_decode(q, k_cache, v_cache, cache_lens, cache_starts=cache_starts,
                                           scale=scale, softcap=softcap, window=window, alibi_slopes=alibi_slopes)
    if q.dim() != 3:
        raise ValueError(f"attention_decode expects q [B, Hq, D], got {tuple(q.shape)}")
    _prefill.check_softcap(softcap)
    window, alibi_slopes = _attention_rules(q, window, alibi_slopes, k_cache.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _decode_op(q, k_cache, v_cache, cache_lens, cache_starts, scale,
                      None if softcap is None else float(softcap), window, alibi_slopes)


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
# Differentiable: the backward is kernels/norms.py `norm_backward`, registered below as the custom
# op `norm_backward` (so torch.compile sees through it too).
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


@_op("norm_backward")
def _norm_bwd_op(grad_y: Tensor, h: Tensor, grad_h: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, is_rms: bool, residual_dtype: Optional[torch.dtype],
                 needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias); those not computed are empty tensors (custom ops cannot
    return None)."""
    grads = _norms.norm_backward(grad_y, h, weight, bias, eps, is_rms, grad_h=grad_h,
                                 residual_dtype=residual_dtype, needs=tuple(needs))
    return tuple(g if g is not None else h.new_empty(0) for g in grads)


@_norm_bwd_op.register_fake
def _(grad_y, h, grad_h, weight, bias, eps, is_rms, residual_dtype, needs):
    none = h.new_empty(0)
    return (h.new_empty(h.shape) if needs[0] else none,
            h.new_empty(h.shape, dtype=residual_dtype) if residual_dtype is not None and needs[1] else none,
            weight.new_empty(weight.shape) if weight is not None and needs[2] else none,
            bias.new_empty(bias.shape) if bias is not None and needs[3] else none)


def _norm_setup(is_rms: bool, residual: bool):
    def setup(ctx, inputs, output):
        x = inputs[0]
        weight = inputs[2] if residual else inputs[1]
        bias = None if is_rms else (inputs[3] if residual else inputs[2])
        ctx.eps, ctx.is_rms = inputs[-1], is_rms
        ctx.residual_dtype = inputs[1].dtype if residual else None
        # the residual form normalises h = x + residual, its second output
        ctx.save_for_backward(output[1] if residual else x, weight, bias)
    return setup


def _norm_backward(residual: bool):
    def backward(ctx, grad_y, grad_h=None):
        h, weight, bias = ctx.saved_tensors
        ni = ctx.needs_input_grad
        if residual:  # inputs (x, residual, weight, [bias,] eps)
            needs = (ni[0], ni[1], ni[2], not ctx.is_rms and ni[3])
        else:         # inputs (x, weight, [bias,] eps)
            needs = (ni[0], False, ni[1], not ctx.is_rms and ni[2])
        dx, dr, dw, db = (g if need and g.numel() else None for g, need in zip(
            _norm_bwd_op(grad_y, h, grad_h if residual else None, weight, bias, ctx.eps, ctx.is_rms,
                         ctx.residual_dtype, list(needs)), needs))
        grads = (dx, dr, dw) if residual else (dx, dw)
        return grads + (() if ctx.is_rms else (db,)) + (None,)
    return backward


_rms_op.register_autograd(_norm_backward(False), setup_context=_norm_setup(True, False))
_rms_res_op.register_autograd(_norm_backward(True), setup_context=_norm_setup(True, True))
_ln_op.register_autograd(_norm_backward(False), setup_context=_norm_setup(False, False))
_ln_res_op.register_autograd(_norm_backward(True), setup_context=_norm_setup(False, True))


# ---------------------------------------------------------------- rotary
@_op("rotary", mutates=("q", "k"))
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, rotary_dim: int) -> None:
    _rotary.rotary(q, k, cos, sin, positions, rotary_dim=rotary_dim)


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, rotary_dim):
    return None


def rotary(q, k, cos, sin, positions, *, rotary_dim=None):
    if _needs_grad(q, k):  # the kernel writes in place outside autograd; the reference records it
        return _reference.rotary(q, k, cos, sin, positions, rotary_dim=rotary_dim)
    rd = q.shape[-1] if rotary_dim is None else int(rotary_dim)
    _rotary_op(q, k, cos, sin, positions, rd)
    return q, k


# ---------------------------------------------------------------- token log-probs
@_op("token_logprobs")
def _tlp_op(hidden: Tensor, weight: Tensor, targets: Tensor, inv_temp: float,
            want_entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _tlp.token_logprobs_forward(hidden, weight, targets, inv_temp, want_entropy)


@_tlp_op.register_fake
def _(hidden, weight, targets, inv_temp, want_entropy):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return torch.empty(n, **f32), torch.empty(n if want_entropy else 0, **f32), torch.empty(n, **f32)


@_op("token_logprobs_backward")
def _tlp_bwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor,
                g_logp: Tensor, g_ent: Optional[Tensor], inv_temp: float, need_hidden: bool,
                need_weight: bool) -> Tuple[Tensor, Tensor]:
    dh, dw = _tlp.token_logprobs_backward(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp,
                                          need_hidden, need_weight)
    # custom ops return tensors, never None: an empty tensor stands for "not asked"
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_tlp_bwd_op.register_fake
def _(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp, need_hidden, need_weight):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)))


def _tlp_setup(ctx, inputs, output):
    hidden, weight, targets, inv_temp, want_entropy = inputs
    ctx.save_for_backward(hidden, weight, targets, output[2], output[1])
    ctx.inv_temp, ctx.want_entropy = inv_temp, want_entropy


def _tlp_backward(ctx, g_logp, g_ent, g_lse):
    # g_lse is ignored: the logsumexp is an internal output kept only for this backward
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    dh, dw = _tlp_bwd_op(hidden, weight, targets, lse, entropy, g_logp,
                         g_ent if ctx.want_entropy else None, ctx.inv_temp, need_h, need_w)
    return (dh if need_h else None), (dw if need_w else None), None, None, None


_tlp_op.register_autograd(_tlp_backward, setup_context=_tlp_setup)


def token_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Fused log p(target) (and entropy); differentiable in hidden and weight (kernels/token_logprobs.py)."""
    from .logprobs_reference import check_token_logprobs

    check_token_logprobs(hidden, weight, targets, temperature)
    logp, entropy, _ = _tlp_op(hidden, weight, targets, 1.0 / float(temperature), bool(return_entropy))
    return (logp, entropy) if return_entropy else logp


# ---------------------------------------------------------------- paged KV cache (kernels/paged_attention.py)
# Forward only (generation): calls that need gradients run on the torch reference. Inputs are checked
# by the shared checks of fastrlhf.ops.paged_reference (values only on CPU tensors: no device sync).
@_op("paged_attention_decode")
def _paged_decode_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, seq_lens: Tensor,
                     alibi_slopes: Optional[Tensor], scale: float, softcap: Optional[float],
                     window: Optional[int]) -> Tensor:
    return _paged.paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, scale=scale, softcap=softcap,
                                         window=window, alibi_slopes=alibi_slopes)


@_paged_decode_op.register_fake
def _(q, k_pool, v_pool, block_tables, seq_lens, alibi_slopes, scale, softcap, window):
    return q.new_empty(q.shape)


def paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, *, scale=None, softcap=None,
                           window=None, alibi_slopes=None):
    if _needs_grad(q, k_pool, v_pool):
        return _paged_ref.paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, scale=scale,
                                                 softcap=softcap, window=window, alibi_slopes=alibi_slopes)
    _paged_ref.check_attention("paged_attention_decode", q, k_pool, v_pool, block_tables, seq_lens, softcap,
                               window, alibi_slopes)
    if seq_lens.shape[0] != q.shape[0]:
        raise ValueError(f"paged_attention_decode: seq_lens has {seq_lens.shape[0]} entries for {q.shape[0]} queries")
    _paged.check_supported(q, k_pool, "paged_attention_decode")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _paged_decode_op(q, k_pool, v_pool, block_tables, seq_lens, alibi_slopes, scale,
                            None if softcap is None else float(softcap), None if window is None else int(window))


@_op("paged_attention_prefill")
def _paged_prefill_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, cu_q_lens: Tensor,
                      seq_lens: Tensor, alibi_slopes: Optional[Tensor], max_q_len: Optional[int], scale: float,
                      softcap: Optional[float], window: Optional[int]) -> Tensor:
    return _paged.paged_attention_prefill(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens, max_q_len=max_q_len,
                                          scale=scale, softcap=softcap, window=window, alibi_slopes=alibi_slopes)


@_paged_prefill_op.register_fake
def _(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens, alibi_slopes, max_q_len, scale, softcap, window):
    return q.new_empty(q.shape)


def paged_attention_prefill(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens, *, max_q_len=None, scale=None,
                            softcap=None, window=None, alibi_slopes=None):
    if _needs_grad(q, k_pool, v_pool):
        return _paged_ref.paged_attention_prefill(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens,
                                                  max_q_len=max_q_len, scale=scale, softcap=softcap, window=window,
                                                  alibi_slopes=alibi_slopes)
    _paged_ref.check_attention("paged_attention_prefill", q, k_pool, v_pool, block_tables, seq_lens, softcap,
                               window, alibi_slopes)
    _paged_ref.check_cu_q_lens("paged_attention_prefill", cu_q_lens, seq_lens, q.shape[0], max_q_len)
    _paged.check_supported(q, k_pool, "paged_attention_prefill")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _paged_prefill_op(q, k_pool, v_pool, block_tables, cu_q_lens, seq_lens, alibi_slopes,
                             None if max_q_len is None else int(max_q_len), scale,
                             None if softcap is None else float(softcap), None if window is None else int(window))


@_op("paged_kv_append", mutates=("k_pool", "v_pool"))
def _paged_append_op(k_pool: Tensor, v_pool: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    _paged.paged_kv_append(k_pool, v_pool, k, v, slot_mapping)


@_paged_append_op.register_fake
def _(k_pool, v_pool, k, v, slot_mapping):
    return None


def paged_kv_append(k_pool, v_pool, k, v, slot_mapping):
    _paged_ref.check_append(k_pool, v_pool, k, v, slot_mapping)
    _paged_append_op(k_pool, v_pool, k, v, slot_mapping)
    return k_pool, v_pool


# ---------------------------------------------------------------- mixture of experts
@_op("fused_moe")
def _fused_moe_op(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor,
                  w_down: Tensor, activation: str) -> Tensor:
    return _moe.fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)


@_fused_moe_op.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation):
    return hidden.new_empty(hidden.shape)


def fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, *, activation="silu"):
    """Sorted-by-expert grouped matmuls (kernels/fused_moe.py); gradients via the reference."""
    _reference.check_fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
    if _needs_grad(hidden, topk_weights, w_gate_up, w_down):
        return _reference.fused_moe(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation=activation)
    return _fused_moe_op(hidden, topk_ids, topk_weights, w_gate_up, w_down, activation)
