"""Backward of the triton ops (attention_prefill, rms_norm, layer_norm) under the Triton CPU
interpreter, against float64 autograd of the torch reference.

fp32 and fp16 (bf16 only on a GPU: tests/gpu/test_triton_gpu.py). Gradient buffers the kernels
allocate are NaN-poisoned (`poison_outputs`), so an element a kernel never writes fails; the
inputs are poisoned where their value must not matter: keys at masked positions are huge, and
the output gradient of query rows that see no key is huge too (those rows are constant zeros,
so nothing may flow back from them). Also: the cuda backend's routing of calls that need
gradients, and an sm_90 compile of the backward kernels (bf16, which the interpreter cannot run).
"""
import pytest
import torch

from conftest import TOL, rel_err
from fastrlhf import ops
from fastrlhf.kernels import norms as norm_kernels
from fastrlhf.kernels._launch import compile_only, poison_outputs
from fastrlhf.ops import cuda_backend as cb
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb

POISON = 1e4  # finite: the float64 reference must stay finite too


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with poison_outputs():
        yield


def _grads_f64(fn, inputs, grads, **kw):
    """Outputs and input gradients of `fn` evaluated in float64 (the ground truth)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    wanted = [t for t in leaves if t is not None]
    return outs, torch.autograd.grad(outs, wanted, [g.double() for g in grads])


def _grads(fn, inputs, grads, **kw):
    leaves = [t for t in inputs if t is not None]
    out = fn(*inputs, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    return outs, torch.autograd.grad(outs, leaves, grads)


# ------------------------------------------------------------------ attention
def _mixed_padding_mask(lengths, total):
    """Row i: lengths[i] real tokens, left-padded for even i, right-padded for odd i."""
    m = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        if i % 2 == 0:
            m[i, total - n:] = 1
        else:
            m[i, :n] = 1
    return m


def _visible(sq, sk, causal, mask):
    """[B, Sq, Sk] bool: which keys each query row sees (the reference's rule)."""
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    allowed = allowed[None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, :]
    return allowed


def _attention_inputs(b, hq, hkv, sq, sk, d, dtype, mask, causal, seed, amp=1.0):
    torch.manual_seed(seed)
    q = torch.randn(b, hq, sq, d) * amp
    k = torch.randn(b, hkv, sk, d) * amp
    v = torch.randn(b, hkv, sk, d)
    grad = torch.randn(b, hq, sq, d)
    if mask is not None:  # masked keys: values that must never be read into the result
        k.masked_fill_(~mask.bool()[:, None, :, None], POISON)
        v.masked_fill_(~mask.bool()[:, None, :, None], -POISON)
    blind = ~_visible(sq, sk, causal, mask).any(-1).expand(b, sq)  # rows that see no key
    grad.masked_fill_(blind[:, None, :, None], POISON)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], grad.to(dtype), blind


# (batch, q heads, kv heads, seq q, seq k, head dim, causal, mask kind, softcap)
ATTENTION_CASES = {
    "seq1": (2, 4, 2, 1, 1, 64, True, None, None),
    "seq17_gqa8to1_mixed_pad": (4, 8, 1, 17, 17, 128, True, "mixed", None),
    "seq130_gqa6to2_mixed_pad": (2, 6, 2, 130, 130, 64, True, "mixed", None),
    "noncausal_random_mask_d80": (3, 4, 2, 33, 33, 80, False, "random", None),
    "softcap_fewer_queries_d96": (2, 4, 2, 17, 40, 96, True, "mixed", 2.0),
    "more_queries_than_keys_d256": (1, 2, 1, 9, 5, 256, True, None, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_backward_matches_float64_reference(case, dtype):
    b, hq, hkv, sq, sk, d, causal, mask_kind, softcap = ATTENTION_CASES[case]
    seed = sum(map(ord, case))
    mask = None
    if mask_kind == "mixed":
        mask = _mixed_padding_mask([sk, sk // 2 + 1, 1, sk - 3][:b], sk)
    elif mask_kind == "random":
        torch.manual_seed(seed)
        mask = (torch.rand(b, sk) > 0.4).long()
        mask[-1] = 0  # a sequence with no visible key at all
    amp = 3.0 if softcap else 1.0  # large scores, so that the cap matters
    (q, k, v), grad, blind = _attention_inputs(b, hq, hkv, sq, sk, d, dtype, mask, causal, seed, amp)
    kw = dict(causal=causal, attention_mask=mask, softcap=softcap)
    (out,), got = _grads(tb.attention_prefill, [q, k, v], [grad], **kw)
    (out64,), expected = _grads_f64(ref.attention_prefill, [q, k, v], [grad], **kw)
    assert out.dtype == dtype and rel_err(out, out64) < TOL[dtype]
    for name, g, e, t in zip("qkv", got, expected, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        if case == "seq1" and name in "qk":
            # one visible key: softmax is constant, dq = dk = 0 up to rounding of O vs v
            assert g.double().norm() < 10 * TOL[dtype] * grad.double().norm() * v.double().norm(), name
            continue
        assert rel_err(g, e) < TOL[dtype], f"d{name}: {rel_err(g, e):.2e}"
    dq, dk, dv = got
    assert torch.all(dq.transpose(1, 2)[blind] == 0), "rows that see no key must get zero dq"
    if mask is not None:
        hidden = ~mask.bool()
        assert torch.all(dk.transpose(1, 2)[hidden] == 0) and torch.all(dv.transpose(1, 2)[hidden] == 0)


def test_attention_backward_strided_inputs_and_public_dispatch():
    """[B, S, H, D] views (as HF's projections give), a bool mask, and the gradient of a
    transposed copy of the output (non-contiguous dO), through ops.attention_prefill."""
    torch.manual_seed(5)
    b, s, hq, hkv, d = 2, 21, 4, 2, 64
    q = torch.randn(b, s, hq, d, requires_grad=True)
    k = torch.randn(b, s, hkv, d, requires_grad=True)
    v = torch.randn(b, s, hkv, d, requires_grad=True)
    mask = _mixed_padding_mask([21, 8], s).bool()
    grad = torch.randn(b, s, hq, d)

    def attn(q, k, v, **kw):
        out = kw.pop("fn")(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                           attention_mask=mask, scale=0.3, **kw)
        return out.transpose(1, 2).contiguous()

    direct = ops.attention_prefill(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="triton")
    assert "fastrlhf_triton_attention_prefill" in type(direct.grad_fn).__name__
    out = attn(q, k, v, fn=ops.attention_prefill, backend="triton")
    got = torch.autograd.grad(out, [q, k, v], grad)
    _, expected = _grads_f64(lambda q, k, v: attn(q, k, v, fn=ref.attention_prefill), [q, k, v], [grad])
    for g, e in zip(got, expected):
        assert rel_err(g, e) < TOL[torch.float32]


def test_attention_forward_without_grad_saves_nothing_and_rejects_backward_of_it():
    q = torch.randn(1, 2, 5, 64)
    out, lse = tb._prefill_op(q, q[:, :1], q[:, :1], None, True, 0.125, None, False)
    assert lse.numel() == 0
    out2, lse2 = tb._prefill_op(q, q[:, :1], q[:, :1], None, True, 0.125, None, True)
    assert torch.equal(out, out2) and lse2.shape == (1, 2, 5) and torch.isfinite(lse2).all()


# ------------------------------------------------------------------ norms
def _norm_case(is_rms, residual, shape, dtype, wdtype, with_w=True, with_b=True, seed=0):
    torch.manual_seed(seed)
    n = shape[-1]
    x = torch.randn(*shape).to(dtype).requires_grad_()
    r = torch.randn(*shape).to(dtype).requires_grad_() if residual else None
    w = torch.randn(n).to(wdtype).requires_grad_() if with_w else None
    bias = torch.randn(n).to(wdtype).requires_grad_() if with_b and not is_rms else None
    grads = [torch.randn(*shape).to(dtype) for _ in range(2 if residual else 1)]
    if is_rms:
        def call(mod, x, r, w, bias):
            return mod.rms_norm(x, w, 1e-5, r)
    else:
        def call(mod, x, r, w, bias):
            return mod.layer_norm(x, w, bias, 1e-5, r)
    return call, [x, r, w, bias], grads


def _check_norm(call, inputs, grads, dtype):
    outs, got = _grads(lambda *a: call(tb, *a), inputs, grads)
    outs64, expected = _grads_f64(lambda *a: call(ref, *a), inputs, grads)
    for o, e in zip(outs, outs64):
        assert rel_err(o, e) < TOL[dtype]
    for g, e, t in zip(got, expected, [t for t in inputs if t is not None]):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, e) < TOL[dtype], f"{tuple(t.shape)}: {rel_err(g, e):.2e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_norm_backward_matches_float64_reference(is_rms, residual, dtype):
    call, inputs, grads = _norm_case(is_rms, residual, (3, 5, 77), dtype, dtype, seed=int(is_rms) + 2 * residual)
    _check_norm(call, inputs, grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_backward_mixed_dtypes_missing_params_and_partial_needs(dtype):
    # fp32 weight on fp16 activations (Gemma's 1 + w is computed in fp32), one row
    call, inputs, grads = _norm_case(True, True, (1, 130), dtype, torch.float32, seed=3)
    _check_norm(call, inputs, grads, dtype)
    # LayerNorm without weight and bias; with weight and no bias
    call, inputs, grads = _norm_case(False, False, (7, 64), dtype, dtype, with_w=False, with_b=False, seed=4)
    _check_norm(call, inputs, grads, dtype)
    call, inputs, grads = _norm_case(False, True, (7, 17), dtype, dtype, with_b=False, seed=5)
    _check_norm(call, inputs, grads, dtype)
    # only the residual and the weight need gradients
    call, (x, r, w, bias), grads = _norm_case(True, True, (4, 40), dtype, dtype, seed=6)
    x = x.detach()
    got = torch.autograd.grad(call(tb, x, r, w, None), [r, w], grads)
    x64, r64, w64 = x.double(), r.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = torch.autograd.grad(call(ref, x64, r64, w64, None), [r64, w64], [g.double() for g in grads])
    for g, e in zip(got, expected):
        assert rel_err(g, e) < TOL[dtype]


def test_norm_weight_gradient_is_a_fixed_order_sum_over_row_blocks(monkeypatch):
    """Several rows per program (13 rows over 4 programs, the last one short), partials summed
    in a fixed order: equal to float64 autograd, and bit-identical when run again."""
    monkeypatch.setattr(norm_kernels, "BWD_PROGRAMS", 4)
    call, inputs, grads = _norm_case(False, True, (13, 50), torch.float32, torch.float32, seed=7)
    first = _check_norm(call, inputs, grads, torch.float32)
    _, again = _grads(lambda *a: call(tb, *a), inputs, grads)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ routing of calls that need gradients
def test_ops_without_backward_kernels_run_gradient_calls_on_the_reference():
    torch.manual_seed(8)
    q = torch.randn(2, 4, 3, 16, requires_grad=True)
    k = torch.randn(2, 2, 3, 16, requires_grad=True)
    ang = torch.randn(9, 8)
    pos = torch.arange(3)[None].repeat(2, 1)
    qr, kr = tb.rotary(q.clone(), k.clone(), ang.cos(), ang.sin(), pos)
    qe, ke = ref.rotary(q.clone(), k.clone(), ang.cos(), ang.sin(), pos)
    g = torch.randn_like(qr)
    assert torch.equal(torch.autograd.grad(qr, q, g)[0], torch.autograd.grad(qe, q, g)[0])
    kc = torch.randn(2, 2, 7, 16, requires_grad=True)
    lens = torch.tensor([7, 4])
    out = tb.attention_decode(q[:, :, 0], kc, kc, lens)
    expected = ref.attention_decode(q[:, :, 0], kc, kc, lens)
    assert torch.equal(out, expected)
    assert torch.equal(torch.autograd.grad(out.sum(), kc)[0], torch.autograd.grad(expected.sum(), kc)[0])


def test_cuda_backend_sends_gradient_calls_to_a_backward_that_exists(monkeypatch):
    """csrc/ is forward-only: calls that need gradients go to the triton backend when it is usable
    (here: the interpreter), else to the reference; never to the extension (not built here)."""
    monkeypatch.setattr(cb, "_ops", lambda: pytest.fail("a call needing gradients reached the cuda kernels"))
    torch.manual_seed(9)
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    y = cb.rms_norm(x, w, 1e-6)
    assert "fastrlhf_triton" in type(y.grad_fn).__name__
    assert cb.backward_of("rms_norm", "cpu").startswith("triton backend: triton kernel")
    q = torch.randn(1, 4, 6, 64, requires_grad=True)
    out = cb.attention_prefill(q, q[:, :2], q[:, :2], causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q)
    q64 = q.detach().double().requires_grad_()
    (dq64,) = torch.autograd.grad(ref.attention_prefill(q64, q64[:, :2], q64[:, :2]).sum(), q64)
    assert rel_err(dq, dq64) < TOL[torch.float32]
    monkeypatch.delenv("TRITON_INTERPRET")  # triton unusable on the CPU: the reference
    y = cb.layer_norm(x, w, None, 1e-5)
    assert "fastrlhf" not in type(y.grad_fn).__name__
    assert cb.backward_of("layer_norm", "cpu").startswith("torch reference")


# ------------------------------------------------------------------ GPU compile (bf16)
def test_backward_kernels_compile_for_sm90_bf16():
    from fastrlhf.kernels import attention_backward, attention_prefill

    q = torch.randn(2, 8, 33, 128, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 33, 128, dtype=torch.bfloat16)
    x = torch.randn(4, 4096, dtype=torch.bfloat16)
    with compile_only(90) as rec:
        attention_prefill.attention_prefill(q, k, k, causal=True, return_lse=True)  # the forward saving lse
        attention_backward.attention_backward(q, q, k, k, q, torch.zeros(2, 8, 33), causal=True,
                                              attention_mask=torch.ones(2, 33, dtype=torch.long))
        norm_kernels.norm_backward(x, x, torch.ones(4096), torch.ones(4096), 1e-5, False, grad_h=x,
                                   residual_dtype=torch.bfloat16)
    names = {r[0] for r in rec.compiled}
    assert names == {"_prefill_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_norm_bwd_kernel",
                     "_partials_kernel"}
    assert any(r[1].get("STORE_LSE") for r in rec.compiled if r[0] == "_prefill_kernel")
    assert all(shared <= 232448 for _, _, shared in rec.compiled)  # H100 shared memory per block
