"""The triton backend against the torch reference, run by the Triton CPU interpreter.

TRITON_INTERPRET=1 is set per test (monkeypatch), not for the whole process: the backend
reads it at call time and wraps its kernels for the current mode on first launch, so this
file behaves the same alone or after other files imported triton, and it does not switch
other files' GPU kernels into the interpreter. fp32 and fp16 only (the interpreter's bf16
tl.dot is wrong; bf16 is covered by tests/gpu/test_triton_gpu.py and the sm_90 compile check).
Outputs the kernels allocate are NaN-poisoned (`poison_outputs`), so an element a kernel
never writes fails the comparison.
"""
import math

import pytest
import torch

from fastrlhf.kernels._launch import poison_outputs
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb
from conftest import TOL, left_pad_mask, rel_err


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with poison_outputs():
        yield


def _fp32_reference(fn, *tensors, **kw):
    """The reference evaluated on fp32 copies (the ground truth for every dtype)."""
    return fn(*[t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors], **kw)


# ------------------------------------------------------------------ prefill attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("seq", [1, 17, 128, 300])
def test_prefill_causal_left_padded_gqa(seq, ratio, dtype):
    torch.manual_seed(seq * 10 + ratio)
    d = 64 if (seq + ratio) % 2 else 128  # both head dims over the grid
    hkv = 2 if ratio == 1 else 1
    b = 3
    q = torch.randn(b, hkv * ratio, seq, d, dtype=dtype)
    k = torch.randn(b, hkv, seq, d, dtype=dtype)
    v = torch.randn(b, hkv, seq, d, dtype=dtype)
    lengths = [seq, (seq + 1) // 2, 1]  # mixed left padding; sequence 2 is almost all pad
    mask = left_pad_mask(lengths, seq)
    out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask)
    expected = _fp32_reference(ref.attention_prefill, q, k, v, causal=True, attention_mask=mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, expected) < TOL[dtype]
    # query rows at pad positions see no key: exactly zero, not NaN
    for bi, n in enumerate(lengths):
        assert torch.all(out[bi, :, : seq - n] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_queries_fewer_than_keys_bottom_right(dtype):
    """Chunked prefill over a cache: query i sees keys j <= i + Sk - Sq."""
    torch.manual_seed(1)
    q = torch.randn(2, 8, 23, 64, dtype=dtype)
    k = torch.randn(2, 2, 150, 64, dtype=dtype)
    v = torch.randn(2, 2, 150, 64, dtype=dtype)
    mask = left_pad_mask([150, 40], 150)
    out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask, scale=0.07)
    expected = _fp32_reference(ref.attention_prefill, q, k, v, causal=True, attention_mask=mask, scale=0.07)
    assert rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("d", [80, 96])
def test_attention_head_dims_not_a_power_of_two(d):
    torch.manual_seed(d)
    q = torch.randn(2, 4, 37, d, dtype=torch.float16)
    k = torch.randn(2, 1, 37, d, dtype=torch.float16)
    v = torch.randn(2, 1, 37, d, dtype=torch.float16)
    mask = left_pad_mask([37, 20], 37)
    out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask)
    expected = _fp32_reference(ref.attention_prefill, q, k, v, causal=True, attention_mask=mask)
    assert rel_err(out, expected) < TOL[torch.float16]
    lens, starts = torch.tensor([37, 30]), torch.tensor([0, 17])
    out = tb.attention_decode(q[:, :, -1], k, v, lens, cache_starts=starts)
    expected = _fp32_reference(ref.attention_decode, q[:, :, -1], k, v, lens, cache_starts=starts)
    assert rel_err(out, expected) < TOL[torch.float16]


def test_prefill_non_causal_arbitrary_bool_mask_strided_inputs():
    """Random (not just left-pad) key masks, no mask rows, and [B, S, H, D]-strided views."""
    torch.manual_seed(2)
    b, s, hq, hkv, d = 3, 45, 4, 2, 64
    q = torch.randn(b, s, hq, d).transpose(1, 2)  # non-contiguous, as from a qkv projection
    k = torch.randn(b, s, hkv, d).transpose(1, 2)
    v = torch.randn(b, s, hkv, d).transpose(1, 2)
    mask = torch.rand(b, s) > 0.4
    mask[2] = False  # a sequence with no visible key at all
    out = tb.attention_prefill(q, k, v, causal=False, attention_mask=mask)
    expected = ref.attention_prefill(q, k, v, causal=False, attention_mask=mask)
    assert torch.all(out[2] == 0)
    assert rel_err(out[:2], expected[:2]) < TOL[torch.float32]
    out_nomask = tb.attention_prefill(q, k, v, causal=False)
    assert rel_err(out_nomask, ref.attention_prefill(q, k, v, causal=False)) < TOL[torch.float32]


def test_prefill_rejects_bad_inputs():
    q = torch.randn(1, 6, 5, 64)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        tb.attention_prefill(q, torch.randn(1, 4, 5, 64), torch.randn(1, 4, 5, 64))
    with pytest.raises(ValueError, match="attention_mask"):
        tb.attention_prefill(q, torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64),
                             attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="share"):
        tb.attention_prefill(q, torch.randn(1, 2, 5, 64).half(), torch.randn(1, 2, 5, 64).half())


# ------------------------------------------------------------------ decode attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("smax", [1, 17, 300, 600])
def test_decode_matches_reference(smax, ratio, dtype):
    torch.manual_seed(smax + ratio)
    d = 128 if (smax + ratio) % 2 else 64
    b, hkv = 4, 2
    q = torch.randn(b, hkv * ratio, d, dtype=dtype)
    kc = torch.randn(b, hkv, smax, d, dtype=dtype)
    vc = torch.randn(b, hkv, smax, d, dtype=dtype)
    lens = torch.randint(1, smax + 1, (b,))
    lens[0] = smax
    starts = (torch.rand(b) * lens).long()  # left-padded prompts start after their padding
    starts[0] = 0
    out = tb.attention_decode(q, kc, vc, lens, cache_starts=starts)
    expected = _fp32_reference(ref.attention_decode, q, kc, vc, lens, cache_starts=starts)
    assert rel_err(out, expected) < TOL[dtype]
    out_no_starts = tb.attention_decode(q, kc, vc, lens)
    assert rel_err(out_no_starts, _fp32_reference(ref.attention_decode, q, kc, vc, lens)) < TOL[dtype]


def test_decode_is_independent_of_batch_composition_and_cache_capacity():
    """Rollout log-probs must not depend on who else is in the batch (fixed split size)."""
    torch.manual_seed(3)
    b, hq, hkv, smax, d = 5, 8, 2, 700, 64
    q = torch.randn(b, hq, d, dtype=torch.float16)
    kc = torch.randn(b, hkv, smax, d, dtype=torch.float16)
    vc = torch.randn(b, hkv, smax, d, dtype=torch.float16)
    lens = torch.tensor([700, 513, 256, 9, 300])
    starts = torch.tensor([0, 100, 255, 3, 299])
    full = tb.attention_decode(q, kc, vc, lens, cache_starts=starts)
    for i in (1, 3):
        alone = tb.attention_decode(q[i:i + 1], kc[i:i + 1], vc[i:i + 1], lens[i:i + 1],
                                    cache_starts=starts[i:i + 1])
        assert torch.equal(alone, full[i:i + 1])
    bigger_k = torch.zeros(b, hkv, 1100, d, dtype=torch.float16)
    bigger_v = torch.zeros_like(bigger_k)
    bigger_k[:, :, :smax], bigger_v[:, :, :smax] = kc, vc
    assert torch.equal(tb.attention_decode(q, bigger_k, bigger_v, lens, cache_starts=starts), full)


def test_decode_rejects_bad_inputs():
    q = torch.randn(2, 4, 64)
    kc = torch.randn(2, 2, 10, 64)
    with pytest.raises(ValueError, match="cache_lens"):
        tb.attention_decode(q, kc, kc, torch.tensor([3]))
    with pytest.raises(TypeError, match="integer"):
        tb.attention_decode(q, kc, kc, torch.tensor([3.0, 2.0]))


# ------------------------------------------------------------------ attention logit softcapping
def _capped_inputs(b, hq, hkv, s, d, dtype, seed):
    """Large-norm q/k (scores of tens at scale 1/sqrt(d)) so a cap of 2.0 changes the result."""
    torch.manual_seed(seed)
    q = (torch.randn(b, hq, s, d) * 3).to(dtype)
    k = (torch.randn(b, hkv, s, d) * 3).to(dtype)
    v = torch.randn(b, hkv, s, d, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("seq", [1, 17, 130])
def test_prefill_softcap_matches_reference(seq, ratio, dtype):
    b, hkv, d, cap = 3, 2, 64, 2.0
    q, k, v = _capped_inputs(b, hkv * ratio, hkv, seq, d, dtype, seed=seq * 7 + ratio)
    lengths = [seq, (seq + 1) // 2, 1]  # mixed left padding
    mask = left_pad_mask(lengths, seq)
    out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask, softcap=cap)
    expected = _fp32_reference(ref.attention_prefill, q, k, v, causal=True, attention_mask=mask, softcap=cap)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, expected) < TOL[dtype]
    for bi, n in enumerate(lengths):
        assert torch.all(out[bi, :, : seq - n] == 0)
    if seq > 1:  # a single visible key gives v whatever the scores: nothing for the cap to change
        uncapped = _fp32_reference(ref.attention_prefill, q, k, v, causal=True, attention_mask=mask)
        assert rel_err(uncapped, expected) > 0.1, "the cap had no effect on these inputs"
        assert rel_err(out, tb.attention_prefill(q, k, v, causal=True, attention_mask=mask)) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_softcap_non_causal_scale_and_fewer_queries(dtype):
    """An explicit scale is applied inside the tanh (cap * tanh(scale * qk / cap)); Sq < Sk."""
    torch.manual_seed(11)
    q = (torch.randn(2, 8, 23, 64) * 3).to(dtype)
    k = (torch.randn(2, 2, 150, 64) * 3).to(dtype)
    v = torch.randn(2, 2, 150, 64, dtype=dtype)
    mask = left_pad_mask([150, 40], 150)
    for causal in (True, False):
        out = tb.attention_prefill(q, k, v, causal=causal, attention_mask=mask, scale=0.3, softcap=5.0)
        expected = _fp32_reference(ref.attention_prefill, q, k, v, causal=causal, attention_mask=mask,
                                   scale=0.3, softcap=5.0)
        assert rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("smax", [1, 17, 130, 300])
def test_decode_softcap_matches_reference(smax, ratio, dtype):
    b, hkv, d, cap = 4, 2, 64, 2.0
    torch.manual_seed(smax * 3 + ratio)
    q = (torch.randn(b, hkv * ratio, d) * 3).to(dtype)
    kc = (torch.randn(b, hkv, smax, d) * 3).to(dtype)
    vc = torch.randn(b, hkv, smax, d, dtype=dtype)
    lens = torch.randint(1, smax + 1, (b,))
    lens[0] = smax
    starts = (torch.rand(b) * lens).long()
    starts[0] = 0
    out = tb.attention_decode(q, kc, vc, lens, cache_starts=starts, softcap=cap)
    expected = _fp32_reference(ref.attention_decode, q, kc, vc, lens, cache_starts=starts, softcap=cap)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, expected) < TOL[dtype]
    if smax > 1:
        uncapped = _fp32_reference(ref.attention_decode, q, kc, vc, lens, cache_starts=starts)
        assert rel_err(uncapped, expected) > 0.1, "the cap had no effect on these inputs"
        assert rel_err(out, tb.attention_decode(q, kc, vc, lens, cache_starts=starts)) > 0.1


def test_softcap_large_scores_stay_finite_and_bad_caps_are_rejected():
    """Scores of thousands (tanh saturates) give no NaN/inf; softcap must be positive and finite."""
    torch.manual_seed(12)
    q, k, v = torch.randn(2, 4, 33, 64) * 30, torch.randn(2, 2, 33, 64) * 30, torch.randn(2, 2, 33, 64)
    mask = left_pad_mask([33, 20], 33)
    out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask, softcap=1.0)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref.attention_prefill(q, k, v, causal=True, attention_mask=mask, softcap=1.0)) \
        < TOL[torch.float32]
    lens = torch.tensor([33, 33])
    dec = tb.attention_decode(q[:, :, -1], k, v, lens, softcap=1.0)
    assert rel_err(dec, ref.attention_decode(q[:, :, -1], k, v, lens, softcap=1.0)) < TOL[torch.float32]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            tb.attention_prefill(q, k, v, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            tb.attention_decode(q[:, :, -1], k, v, lens, softcap=bad)


# ------------------------------------------------------------------ KV-cache append
@pytest.mark.parametrize("t", [1, 19])
def test_kv_cache_append_matches_reference(t):
    torch.manual_seed(t)
    kc = torch.randn(3, 2, 40, 80, dtype=torch.float16)
    vc = torch.randn(3, 2, 40, 80, dtype=torch.float16)
    k = torch.randn(3, 2, t, 80, dtype=torch.float16)
    v = torch.randn(3, 2, t, 80, dtype=torch.float16)
    pos = torch.tensor([0, 40 - t, 7])
    kr, vr = kc.clone(), vc.clone()
    ref.kv_cache_append(kr, vr, k, v, pos)
    tb.kv_cache_append(kc, vc, k, v, pos)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_kv_cache_append_and_decode_accept_expanded_position_tensors():
    """The engine passes one write column for the whole batch as an expanded (stride-0) tensor."""
    torch.manual_seed(9)
    kc, vc = torch.randn(3, 2, 30, 64), torch.randn(3, 2, 30, 64)
    k, v = torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64)
    col = torch.tensor(11).expand(3)
    assert col.stride() == (0,)
    kr, vr = kc.clone(), vc.clone()
    ref.kv_cache_append(kr, vr, k, v, col)
    tb.kv_cache_append(kc, vc, k, v, col)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    q = torch.randn(3, 8, 64)
    lens, starts = torch.tensor(12).expand(3), torch.tensor(4).expand(3)
    out = tb.attention_decode(q, kc, vc, lens, cache_starts=starts)
    assert rel_err(out, ref.attention_decode(q, kc, vc, lens, cache_starts=starts)) < TOL[torch.float32]


def test_kv_cache_append_overflow_is_a_clear_error():
    kc = torch.zeros(1, 1, 8, 16)
    with pytest.raises(IndexError, match="capacity"):
        tb.kv_cache_append(kc, kc.clone(), torch.ones(1, 1, 3, 16), torch.ones(1, 1, 3, 16), torch.tensor([6]))


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 8, 40])
@pytest.mark.parametrize("rows", [1, 37])
def test_lora_linear_forward(rows, rank, dtype):
    torch.manual_seed(rows * 100 + rank)
    fin, fout = 96, 131
    x = torch.randn(rows, 3, fin, dtype=dtype)
    w = torch.randn(fout, fin, dtype=dtype) / math.sqrt(fin)
    bias = torch.randn(fout, dtype=dtype)
    a = torch.randn(rank, fin, dtype=dtype) / math.sqrt(fin)
    bm = torch.randn(fout, rank, dtype=dtype)
    out = tb.lora_linear(x, w, bias, a, bm, 1.5)
    expected = _fp32_reference(ref.lora_linear, x, w, bias, a, bm, 1.5)
    assert out.dtype == dtype and out.shape == (rows, 3, fout)
    assert rel_err(out, expected) < TOL[dtype]
    # the LoRA term is really added (it is a sizeable part of the output)
    base = _fp32_reference(ref.lora_linear, x, w, bias, None, None, 0.0)
    assert rel_err(base, expected) > 100 * TOL[dtype]
    assert rel_err(tb.lora_linear(x, w, None, None, None, 1.0), ref.lora_linear(x, w, None, None, None, 1.0)) == 0


def test_lora_linear_backward_matches_autograd_of_reference():
    torch.manual_seed(4)
    x = torch.randn(2, 9, 48, dtype=torch.float64).float().requires_grad_()
    params = [torch.randn(70, 48) / 7, torch.randn(70), torch.randn(12, 48) / 7, torch.randn(70, 12)]
    params = [p.requires_grad_() for p in params]
    grad = torch.randn(2, 9, 70)
    out = tb.lora_linear(x, *params, 0.5)
    got = torch.autograd.grad(out, [x, *params], grad)
    expected = torch.autograd.grad(ref.lora_linear(x, *params, 0.5), [x, *params], grad)
    for name, g, e in zip(["x", "weight", "bias", "lora_a", "lora_b"], got, expected):
        assert rel_err(g, e) < 1e-5, name
    # frozen base (the usual LoRA setup): only the adapters and x get gradients
    w, bias = params[0].detach(), params[1].detach()
    out = tb.lora_linear(x, w, bias, params[2], params[3], 0.5)
    ga, gb = torch.autograd.grad(out, [params[2], params[3]], grad)
    assert rel_err(ga, expected[3]) < 1e-5 and rel_err(gb, expected[4]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_fuse_unfuse(dtype):
    torch.manual_seed(5)
    w = torch.randn(70, 133, dtype=dtype)
    a = torch.randn(20, 133, dtype=dtype) * 0.1
    bm = torch.randn(70, 20, dtype=dtype) * 0.1
    fused = tb.lora_fuse(w, a, bm, 2.0)
    expected = ref.lora_fuse(w, a, bm, 2.0)
    # the product is computed in fp32 and rounded once: at most one ulp from the reference
    assert (fused.float() - expected.float()).abs().max() <= 2 * torch.finfo(dtype).eps * expected.abs().max()
    in_place = w.clone()
    tb.lora_fuse(in_place, a, bm, 2.0, out=in_place)
    assert torch.equal(in_place, fused)
    restored = tb.lora_unfuse(fused, a, bm, 2.0)
    assert rel_err(restored, w) < TOL[dtype]
    with pytest.raises(ValueError, match="do not chain"):
        tb.lora_fuse(w, a, bm.t().contiguous(), 1.0)


# ------------------------------------------------------------------ norms
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 300, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norms(n, dtype, with_residual):
    torch.manual_seed(n)
    x = torch.randn(3, 5, n, dtype=dtype) * 3 + 1
    res = torch.randn(3, 5, n, dtype=dtype) if with_residual else None
    w = torch.randn(n, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    cases = [
        (tb.rms_norm(x, w, 1e-6, res), ref.rms_norm(x, w, 1e-6, res)),
        (tb.rms_norm(x, None, 1e-5, res), ref.rms_norm(x, None, 1e-5, res)),
        (tb.layer_norm(x, w, bias, 1e-5, res), ref.layer_norm(x, w, bias, 1e-5, res)),
        (tb.layer_norm(x, None, None, 1e-5, res), ref.layer_norm(x, None, None, 1e-5, res)),
    ]
    for got, expected in cases:
        if with_residual:
            assert torch.equal(got[1], expected[1])  # the residual stream is bit-exact
            got, expected = got[0], expected[0]
        if n == 1 and expected.abs().max() == 0:  # layer norm of one feature is exactly 0
            assert torch.all(got == 0)
            continue
        assert rel_err(got, expected) < TOL[dtype]


# ------------------------------------------------------------------ rotary
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rotary_in_place(dtype, rotary_dim):
    torch.manual_seed(6)
    b, s, hq, hk, d = 3, 17, 8, 2, 64
    # q and k as strided views of one fused qkv activation, the layout models produce
    qkv = torch.randn(b, s, hq + 2 * hk, d, dtype=dtype)
    q = qkv[:, :, :hq].transpose(1, 2)
    k = qkv[:, :, hq:hq + hk].transpose(1, 2)
    rd = d if rotary_dim is None else rotary_dim
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
    angles = torch.arange(400).float()[:, None] * inv[None]
    cos, sin = angles.cos(), angles.sin()
    pos = (torch.arange(s)[None] + torch.tensor([[0], [5], [380]])).clamp_min(0)
    pos[1, :4] = 0  # left-padded positions
    q_ref, k_ref = q.clone(), k.clone()
    ref.rotary(q_ref, k_ref, cos, sin, pos, rotary_dim=rotary_dim)
    untouched_v = qkv[:, :, hq + hk:].clone()
    q_out, k_out = tb.rotary(q, k, cos, sin, pos, rotary_dim=rotary_dim)
    assert q_out is q and k_out is k
    assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k, k_ref) < TOL[dtype]
    assert torch.equal(q[..., rd:], q_ref[..., rd:])  # the non-rotary features are untouched
    assert torch.equal(qkv[:, :, hq + hk:], untouched_v)
    with pytest.raises(TypeError, match="float32"):
        tb.rotary(q, k, cos.half(), sin.half(), pos, rotary_dim=rotary_dim)


# ------------------------------------------------------------------ torch.library registration
def test_custom_ops_have_fake_implementations():
    """torch.compile / CUDA graphs trace the ops through their fake (meta) implementations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 5, 64, dtype=torch.float16)
        k = torch.empty(2, 2, 5, 64, dtype=torch.float16)
        assert tb.attention_prefill(q, k, k).shape == q.shape
        assert tb.attention_decode(q[:, :, 0], k, k, torch.empty(2, dtype=torch.long)).shape == (2, 8, 64)
        assert tb.attention_prefill(q, k, k, softcap=50.0).shape == q.shape
        assert tb.attention_decode(q[:, :, 0], k, k, torch.empty(2, dtype=torch.long),
                                   softcap=50.0).shape == (2, 8, 64)
        x = torch.empty(3, 4, 32)
        y = tb.lora_linear(x, torch.empty(48, 32), None, torch.empty(4, 32), torch.empty(48, 4), 1.0)
        assert y.shape == (3, 4, 48)
        normed, h = tb.rms_norm(x, None, 1e-6, x)
        assert normed.shape == h.shape == x.shape


def test_opcheck_schemas_and_fakes():
    torch.manual_seed(7)
    q = torch.randn(2, 4, 5, 64)
    k = torch.randn(2, 2, 5, 64)
    mask = left_pad_mask([5, 3], 5)
    tests = ("test_schema", "test_faketensor")
    ops = torch.ops.fastrlhf_triton
    torch.library.opcheck(ops.attention_prefill, (q, k, k, mask, True, 0.125), test_utils=tests)
    torch.library.opcheck(ops.attention_decode, (q[:, :, 0], k, k, torch.tensor([5, 4]), None, 0.125),
                          test_utils=tests)
    torch.library.opcheck(ops.attention_prefill, (q, k, k, mask, True, 0.125, 2.0), test_utils=tests)
    torch.library.opcheck(ops.attention_decode, (q[:, :, 0], k, k, torch.tensor([5, 4]), None, 0.125, 2.0),
                          test_utils=tests)
    torch.library.opcheck(ops.rms_norm_residual, (q, q.clone(), None, 1e-6), test_utils=tests)
    torch.library.opcheck(ops.lora_linear, (torch.randn(3, 32), torch.randn(48, 32), None,
                                            torch.randn(4, 32), torch.randn(48, 4), 2.0),
                          test_utils=tests + ("test_autograd_registration",))
    torch.library.opcheck(ops.rotary, (q.clone(), k.clone(), torch.randn(9, 32), torch.randn(9, 32),
                                       torch.zeros(2, 5, dtype=torch.long), 64), test_utils=tests)


def test_torch_compile_fullgraph_through_the_ops_including_in_place_ones():
    """Dynamo + AOT autograd (functionalisation of the in-place ops) trace one graph."""
    torch.manual_seed(8)
    q, k = torch.randn(2, 4, 9, 64), torch.randn(2, 2, 9, 64)
    w = torch.randn(64)
    cos, sin = torch.randn(20, 32), torch.randn(20, 32)
    pos = torch.arange(9)[None].repeat(2, 1)
    caches = torch.zeros(2, 2, 2, 16, 64)

    def block(q, k, kc, vc):
        tb.rotary(q, k, cos, sin, pos)
        tb.kv_cache_append(kc, vc, k, k, torch.tensor([0, 3]))
        y, h = tb.rms_norm(tb.attention_prefill(q, k, k, causal=True), w, 1e-6, q)
        return y, h, tb.attention_decode(q[:, :, -1], kc, vc, torch.tensor([9, 12]))

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    args_c = [q.clone(), k.clone(), caches[0].clone(), caches[1].clone()]
    args_e = [q.clone(), k.clone(), caches[0].clone(), caches[1].clone()]
    for got, expected in zip(compiled(*args_c), block(*args_e)):
        assert torch.equal(got, expected)
    for got, expected in zip(args_c, args_e):  # the in-place updates happened, once
        assert torch.equal(got, expected)
    assert not torch.equal(args_c[0], q) and args_c[2].abs().sum() > 0
