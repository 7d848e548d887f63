"""Sliding window, ALiBi and packed sequences in the triton attention kernels (prefill forward and
backward, decode), under the Triton CPU interpreter, against the float64 torch reference.

fp32 and fp16 (bf16: tests/gpu/test_triton_gpu.py and the sm_90 compile check below). Shapes are
odd and cross the interpreter's 64-wide tiles: windows that start inside a tile, packed boundaries
inside tiles and on a tile edge, one-token sequences, tokens after the last boundary. Kernel outputs
and gradients are NaN-poisoned (`poison_outputs`); key/value rows no query may read are poisoned
too where that proves a tile is skipped, and the output gradient of rows that see no key is huge.
"""
import pytest
import torch

from conftest import TOL, left_pad_mask, rel_err
from fastrlhf import ops
from fastrlhf.kernels import attention_prefill as prefill_kernels
from fastrlhf.kernels._launch import compile_only, poison_outputs
from fastrlhf.ops import attention_args
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb

POISON = 1e4  # finite: the float64 reference must stay finite too
FP32, FP16 = torch.float32, torch.float16


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with poison_outputs():
        yield


def _inputs(b, hq, hkv, sq, sk, d, dtype, seed, amp=1.0):
    torch.manual_seed(seed)
    q = (torch.randn(b, hq, sq, d) * amp).to(dtype)
    k = (torch.randn(b, hkv, sk, d) * amp).to(dtype)
    v = torch.randn(b, hkv, sk, d).to(dtype)
    return q, k, v


def _f64(fn, *tensors, **kw):
    return fn(*[t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors], **kw)


def _slopes(hq, seed):
    torch.manual_seed(seed)
    return torch.rand(hq) * 0.5 + 0.05


# ------------------------------------------------------------------ prefill forward
# (b, hq, hkv, sq, sk, window, left-pad lengths, alibi, softcap)
PREFILL_CASES = {
    "window1_left_pad_gqa": (2, 4, 2, 70, 70, 1, [70, 33], False, None),
    "window70_mqa_alibi_softcap": (1, 4, 1, 150, 150, 70, None, True, 2.0),  # windows start mid-tile
    "window40_bottom_right_mask": (2, 4, 2, 23, 150, 40, [150, 60], False, None),
    "alibi_gqa3_left_pad": (2, 6, 2, 45, 45, None, [45, 20], True, None),
}


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
def test_prefill_window_alibi_match_float64_reference(case, dtype):
    b, hq, hkv, sq, sk, window, lengths, alibi, cap = PREFILL_CASES[case]
    q, k, v = _inputs(b, hq, hkv, sq, sk, 64, dtype, seed=sum(map(ord, case)), amp=2.0 if alibi or cap else 1.0)
    mask = left_pad_mask(lengths, sk) if lengths else None
    kw = dict(attention_mask=mask, softcap=cap, window=window,
              alibi_slopes=_slopes(hq, 1) if alibi else None)
    out = tb.attention_prefill(q, k, v, **kw)
    expected = _f64(ref.attention_prefill, q, k, v, **kw)
    assert out.dtype == dtype and rel_err(out, expected) < TOL[dtype]
    if window == 1 and sq == sk:  # each query sees only itself: its own value row (0 at pad rows)
        visible = mask.bool()[:, None, :, None].expand_as(out)
        assert torch.equal(out[visible], v.repeat_interleave(hq // hkv, 1)[visible])
        assert torch.all(out[~visible] == 0)


def test_window_covering_every_key_is_no_window():
    """A window >= Sk hides nothing: the kernel given it (window = Sk, bypassing the wrapper, which
    drops such windows) computes the same as without one."""
    q, k, v = _inputs(2, 4, 2, 70, 70, 32, torch.float32, seed=3)
    mask = left_pad_mask([70, 41], 70)
    plain = tb.attention_prefill(q, k, v, attention_mask=mask)
    assert torch.equal(prefill_kernels.attention_prefill(q, k, v, attention_mask=mask, window=70), plain)
    assert torch.equal(tb.attention_prefill(q, k, v, attention_mask=mask, window=1000), plain)


# cumulative boundaries over 150 tokens (64-wide tiles): one-token sequences at 0, 1 and 64,
# a boundary on the tile edge 64, boundaries inside tiles, 10 tokens after the last boundary
PACKED_CU = [0, 1, 2, 50, 64, 65, 140]
# (hq, hkv, causal, window, alibi, softcap)
PACKED_CASES = {
    "causal_gqa_softcap": (4, 2, True, None, False, 2.0),
    "causal_mqa_window_alibi": (4, 1, True, 20, True, None),
    "bidirectional_gqa": (6, 2, False, None, False, None),
}


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("case", sorted(PACKED_CASES))
def test_packed_prefill_matches_float64_reference(case, dtype):
    hq, hkv, causal, window, alibi, cap = PACKED_CASES[case]
    t = 150
    q, k, v = _inputs(1, hq, hkv, t, t, 64, dtype, seed=sum(map(ord, case)), amp=2.0 if cap else 1.0)
    cu = torch.tensor(PACKED_CU, dtype=torch.int32)
    kw = dict(causal=causal, cu_seqlens=cu, softcap=cap, window=window,
              alibi_slopes=_slopes(hq, 2) if alibi else None)
    out = tb.attention_prefill(q, k, v, **kw)
    assert rel_err(out, _f64(ref.attention_prefill, q, k, v, **kw)) < TOL[dtype]
    assert torch.all(out[:, :, PACKED_CU[-1]:] == 0)
    # one-token sequences attend to themselves only
    for n in (0, 1, 64):
        assert rel_err(out[0, :, n], v[0, :, n].repeat_interleave(hq // hkv, 0)) < TOL[dtype]


# ------------------------------------------------------------------ backward
def _blind_rows(q, k, kw):
    """[B, Sq] bool: the query rows that see no key (the reference's rule: attention over values
    of 1 is 1 where a row sees a key, 0 where it sees none)."""
    b, _, sq, _ = q.shape
    probe = ref.attention_prefill(torch.zeros(b, 1, sq, 1, dtype=torch.float64),
                                  torch.zeros(b, 1, k.shape[2], 1, dtype=torch.float64),
                                  torch.ones(b, 1, k.shape[2], 1, dtype=torch.float64),
                                  **{**kw, "alibi_slopes": None, "softcap": None})
    return probe[:, 0, :, 0] == 0


# (b, hq, hkv, s, window, left-pad lengths, alibi, softcap, packed cu, causal)
BACKWARD_CASES = {
    "window37_alibi_softcap_left_pad": (2, 4, 2, 80, 37, [80, 45], True, 2.0, None, True),
    "packed_gqa_window": (1, 4, 2, 130, 24, None, False, None, [0, 1, 70, 71, 120], True),
    "packed_alibi_bidirectional": (1, 2, 1, 90, None, None, True, None, [0, 30, 31, 90], False),
}

@pytest.mark.parametrize("case,dtype", [(c, d) for c in sorted(BACKWARD_CASES) for d in (FP32, FP16)
                                        if (c, d) != ("packed_alibi_bidirectional", FP16)])
def test_backward_window_alibi_packed_match_float64_reference(case, dtype):
    b, hq, hkv, s, window, lengths, alibi, cap, cu, causal = BACKWARD_CASES[case]
    q, k, v = _inputs(b, hq, hkv, s, s, 64, dtype, seed=sum(map(ord, case)), amp=2.0 if cap else 1.0)
    mask = left_pad_mask(lengths, s) if lengths else None
    kw = dict(causal=causal, attention_mask=mask, softcap=cap, window=window,
              alibi_slopes=_slopes(hq, 3) if alibi else None,
              cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
    torch.manual_seed(4)
    grad = torch.randn(b, hq, s, 64)
    blind = _blind_rows(q, k, kw)
    grad.masked_fill_(blind[:, None, :, None], POISON)
    if mask is not None:  # padding keys: values that must never be read into the result
        k = k.masked_fill(~mask.bool()[:, None, :, None], POISON).to(dtype)
        v = v.masked_fill(~mask.bool()[:, None, :, None], -POISON).to(dtype)
    grad = grad.to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tb.attention_prefill(*leaves, **kw)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = ref.attention_prefill(*leaves64, **kw)
    expected = torch.autograd.grad(out64, leaves64, grad.double())
    assert rel_err(out, out64) < TOL[dtype]
    for name, g, e in zip("qkv", got, expected):
        assert g.dtype == dtype and rel_err(g, e) < TOL[dtype], f"d{name}: {rel_err(g, e):.2e}"
    dq, dk, dv = got
    assert torch.all(dq.transpose(1, 2)[blind] == 0), "rows that see no key must get zero dq"
    if cu is not None:  # tokens after the last boundary: no key gradient either
        assert torch.all(dk[:, :, cu[-1]:] == 0) and torch.all(dv[:, :, cu[-1]:] == 0)


def test_window_skips_key_tiles_outside_it_forward_and_backward():
    """Keys outside every query's window are NaN: a kernel that loaded their tiles would spread
    NaN (0 * NaN) into the output or dq. 10 queries at the end of 300 keys, window 20: tiles 0-3
    (keys 0-255) must never be read; their dk/dv are exactly 0."""
    q, k, v = _inputs(1, 4, 2, 10, 300, 32, torch.float32, seed=5)
    k[:, :, :256], v[:, :, :256] = float("nan"), float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tb.attention_prefill(*leaves, window=20, alibi_slopes=_slopes(4, 6))
    expected = ref.attention_prefill(q.double(), k[:, :, 256:].double(), v[:, :, 256:].double(),
                                     window=20, alibi_slopes=_slopes(4, 6))
    assert rel_err(out, expected) < TOL[torch.float32]
    dq, dk, dv = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert torch.isfinite(dq).all()
    assert torch.all(dk[:, :, :256] == 0) and torch.all(dv[:, :, :256] == 0)


# ------------------------------------------------------------------ decode
# (hq, window, alibi, softcap); the cache is 400 columns: two 256-column splits of the split-K
DECODE_CASES = {"window1": (4, 1, False, None), "window200_across_splits": (8, 200, False, None),
                "window70_alibi_softcap_gqa": (8, 70, True, 2.0), "alibi_mha": (2, None, True, None)}


@pytest.mark.parametrize("case,dtype", [(c, FP32) for c in sorted(DECODE_CASES)]
                         + [("window70_alibi_softcap_gqa", FP16)])
def test_decode_window_alibi_match_float64_reference(case, dtype):
    hq, window, alibi, cap = DECODE_CASES[case]
    b, hkv, smax, d = 3, 2, 400, 64
    torch.manual_seed(sum(map(ord, case)))
    q = (torch.randn(b, hq, d) * 2).to(dtype)
    kc = (torch.randn(b, hkv, smax, d) * 2).to(dtype)
    vc = torch.randn(b, hkv, smax, d).to(dtype)
    lens, starts = torch.tensor([400, 300, 9]), torch.tensor([0, 100, 3])
    kw = dict(cache_starts=starts, softcap=cap, window=window, alibi_slopes=_slopes(hq, 7) if alibi else None)
    if window is not None:  # cache columns before every window are never read
        first = torch.maximum(starts, lens - window)
        for bi in range(b):
            kc[bi, :, : (int(first[bi]) // 64) * 64] = float("nan")
            vc[bi, :, : (int(first[bi]) // 64) * 64] = float("nan")
    out = tb.attention_decode(q, kc, vc, lens, **kw)
    expected = _f64(ref.attention_decode, q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), lens, **kw)
    assert out.dtype == dtype and rel_err(out, expected) < TOL[dtype]


# ------------------------------------------------------------------ arguments, registration, compile
def test_bad_arguments_and_constant_slopes():
    q = torch.randn(1, 4, 9, 16)
    k = torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="window must be a positive int"):
        tb.attention_prefill(q, k, k, window=0)
    with pytest.raises(ValueError, match="causal"):
        tb.attention_prefill(q, k, k, causal=False, window=3)
    with pytest.raises(ValueError, match=r"alibi_slopes must be a float tensor of shape \[4\]"):
        tb.attention_decode(q[:, :, 0], k, k, torch.tensor([9]), alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="not both"):
        tb.attention_prefill(q, k, k, attention_mask=torch.ones(1, 9), cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="never decrease"):
        tb.attention_prefill(q, k, k, cu_seqlens=torch.tensor([0, 5, 3, 9]))
    slopes = torch.rand(4, requires_grad=True)
    with pytest.raises(ValueError, match="constants"):
        tb.attention_prefill(q, k, k, alibi_slopes=slopes)


def test_new_arguments_trace_through_fakes_opcheck_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(8)
    q, k = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16)
    slopes = torch.rand(4)
    bounds = torch.stack(attention_args.packed_key_ranges(torch.tensor([0, 4, 9]), 9))
    ops_ns = torch.ops.fastrlhf_triton
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops_ns.attention_prefill, (q, k, k, None, True, 0.25, None, True, 3, slopes, bounds),
                          test_utils=tests)
    torch.library.opcheck(ops_ns.attention_decode, (q[:, :, 0], k, k, torch.tensor([9]), None, 0.25, None, 4,
                                                    slopes), test_utils=tests)
    with FakeTensorMode():
        fq, fk = torch.empty(1, 4, 9, 16), torch.empty(1, 2, 9, 16)
        assert tb.attention_prefill(fq, fk, fk, window=3, alibi_slopes=torch.empty(4)).shape == fq.shape

    def block(q, k, cu):
        out = tb.attention_prefill(q, k, k, cu_seqlens=cu, window=3, alibi_slopes=slopes)
        return out, tb.attention_decode(q[:, :, -1], k, k, torch.tensor([9]), window=2, alibi_slopes=slopes)

    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(q, k, cu), block(q, k, cu)):
        assert torch.equal(got, expected)


def test_window_alibi_packed_kernels_compile_for_sm90_bf16():
    """One variant with every new branch on, per kernel (the plain variants: test_triton_compile)."""
    from fastrlhf.kernels import attention_backward

    dtype = torch.bfloat16
    q = torch.randn(1, 8, 33, 128, dtype=dtype)
    k = torch.randn(1, 2, 33, 128, dtype=dtype)
    slopes = torch.rand(8)
    bounds = torch.stack(attention_args.packed_key_ranges(torch.tensor([0, 5, 33]), 33))
    rules = dict(window=8, alibi_slopes=slopes, seq_bounds=bounds)
    with compile_only(90) as rec:
        prefill_kernels.attention_prefill(q, k, k, return_lse=True, **rules)
        attention_backward.attention_backward(q, q, k, k, q, torch.zeros(1, 8, 33), **rules)
        tb.attention_decode(q[:, :, 0], k, k, torch.tensor([33]), window=8, alibi_slopes=slopes)
    flags = {r[0]: tuple(r[1].get(f) for f in ("WINDOW", "ALIBI", "PACKED")) for r in rec.compiled}
    assert flags == {"_prefill_kernel": (True, True, True), "_delta_kernel": (None, None, None),
                     "_dkdv_kernel": (True, True, True), "_dq_kernel": (True, True, True),
                     "_decode_partial_kernel": (True, True, None), "_decode_reduce_kernel": (True, None, None)}
    assert all(shared <= 232448 for _, _, shared in rec.compiled)  # H100 shared memory per block


def test_public_wrapper_reaches_the_kernels():
    """ops.attention_prefill(backend='triton') hands window/alibi/cu_seqlens to the kernels (the
    autograd node is the triton custom op), not to a fallback."""
    q, k = torch.randn(1, 2, 7, 16, requires_grad=True), torch.randn(1, 2, 7, 16)
    out = ops.attention_prefill(q, k, k, window=2, alibi_slopes=torch.rand(2),
                                cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), backend="triton")
    assert "fastrlhf_triton_attention_prefill" in type(out.grad_fn).__name__
