"""The cuda backend (csrc/) against the torch reference on a GPU.

Fresh random inputs with odd shapes (lengths that are not multiples of any block or split),
left padding, GQA ratios 1/4/8 (and MQA), head dims 64/80/96/128, fp16/bf16/fp32.
FASTRLHF_CUDA_POISON=1 makes the extension fill every output and workspace with NaN
before a kernel runs, so an element it fails to write fails the test. The reference runs
on fp32 copies of the inputs. Skipped without CUDA (run by benchmarks/gpu_suite.sh).
"""
import math
import os

import pytest
import torch

from conftest import TOL, as_fp32, left_pad_mask, rel_err
from fastrlhf import ops
from fastrlhf.ops import cuda_backend as cb
from fastrlhf.ops import reference as ref

pytestmark = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def extension():
    os.environ["FASTRLHF_CUDA_POISON"] = "1"  # read by the extension on every call
    ok, why = cb.load_extension()
    assert ok, f"the CUDA extension did not build/load: {why}"


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,hq,hkv,d,smax", [
    (5, 8, 8, 128, 1000),    # MHA
    (3, 32, 8, 64, 777),     # GQA 4
    (4, 16, 2, 128, 4099),   # GQA 8, > 16 splits
    (2, 12, 4, 96, 300),     # head dim 96: idle lanes in a key row
    (3, 40, 5, 128, 600),    # group of 8 exactly
    (2, 16, 1, 64, 513),     # MQA: group 16 -> two query-head chunks
])
def test_decode_matches_reference(b, hq, hkv, d, smax, dtype):
    torch.manual_seed(b * 1000 + smax)
    q = torch.randn(b, hq, d, dtype=dtype, device=DEV)
    kc = torch.randn(b, hkv, smax, d, dtype=dtype, device=DEV)  # garbage past each length too
    vc = torch.randn(b, hkv, smax, d, dtype=dtype, device=DEV)
    lens = torch.randint(1, smax + 1, (b,), device=DEV)
    lens[0] = smax
    starts = (torch.rand(b, device=DEV) * lens.float() * 0.5).long()  # left padding
    starts[-1] = lens[-1]  # nothing visible -> zeros
    out = cb.attention_decode(q, kc, vc, lens, cache_starts=starts)
    expected = ref.attention_decode(*as_fp32(q, kc, vc), lens, cache_starts=starts)
    assert rel_err(out, expected) < TOL[dtype]
    assert torch.all(out[-1] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_independent_of_batch_and_capacity(dtype):
    """Fixed split size: a sequence's output is bitwise the same alone, in a batch, and in
    a larger cache (rollout log-probs must match the trainer's recomputation)."""
    torch.manual_seed(7)
    b, hq, hkv, d, smax = 6, 16, 4, 128, 1500
    q = torch.randn(b, hq, d, dtype=dtype, device=DEV)
    kc = torch.randn(b, hkv, smax, d, dtype=dtype, device=DEV)
    vc = torch.randn(b, hkv, smax, d, dtype=dtype, device=DEV)
    lens = torch.tensor([1500, 3, 700, 1025, 256, 257], device=DEV)
    full = cb.attention_decode(q, kc, vc, lens)
    big_k = torch.randn(b, hkv, 3000, d, dtype=dtype, device=DEV)
    big_v = torch.randn(b, hkv, 3000, d, dtype=dtype, device=DEV)
    big_k[:, :, :smax], big_v[:, :, :smax] = kc, vc
    bigger = cb.attention_decode(q, big_k, big_v, lens)
    for i in range(b):
        alone = cb.attention_decode(q[i:i + 1], kc[i:i + 1], vc[i:i + 1], lens[i:i + 1])
        assert torch.equal(alone[0], full[i])
        assert torch.equal(bigger[i], full[i])


def test_decode_strided_query_and_int32_lengths():
    torch.manual_seed(3)
    b, hq, hkv, d, smax = 3, 8, 2, 64, 333
    qkv = torch.randn(b, 3 * hq, d, dtype=torch.float16, device=DEV)
    q = qkv[:, hq:2 * hq]  # a view: batch stride 3*hq*d
    kc = torch.randn(b, hkv, smax, d, dtype=torch.float16, device=DEV)
    vc = torch.randn(b, hkv, smax, d, dtype=torch.float16, device=DEV)
    lens = torch.tensor([333, 100, 1], dtype=torch.int32, device=DEV)
    out = cb.attention_decode(q, kc, vc, lens, scale=0.3)
    expected = ref.attention_decode(*as_fp32(q, kc, vc), lens, scale=0.3)
    assert rel_err(out, expected) < TOL[torch.float16]


# ---------------------------------------------------------------- prefill
@pytest.fixture(params=["wmma", "mma"])
def prefill_kernel(request, monkeypatch):
    """Both prefill kernels: WMMA (default) and the register-resident mma.sync variant."""
    monkeypatch.setenv("FASTRLHF_PREFILL_KERNEL", request.param)  # read by the extension per call
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal", [
    (2, 4, 4, 123, 123, 64, True),
    (3, 8, 2, 77, 77, 128, True),     # GQA 4
    (2, 8, 1, 200, 200, 96, True),    # MQA
    (2, 16, 2, 65, 65, 80, False),    # GQA 8, non-causal
    (2, 4, 4, 37, 300, 128, True),    # chunked prefill: bottom-right causal
    (3, 4, 2, 1, 129, 64, True),      # one query over a cache
    (1, 8, 8, 1000, 1000, 128, True),
])
def test_prefill_matches_reference(b, hq, hkv, sq, sk, d, causal, dtype, prefill_kernel):
    torch.manual_seed(sq * 7 + sk + d)
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=DEV)
    k = torch.randn(b, hkv, sk, d, dtype=dtype, device=DEV)
    v = torch.randn(b, hkv, sk, d, dtype=dtype, device=DEV)
    lengths = [sk] + [max(1, sk - 17 * (i + 1)) for i in range(b - 1)]
    mask = left_pad_mask(lengths, sk, device=DEV)
    out = cb.attention_prefill(q, k, v, causal=causal, attention_mask=mask)
    expected = ref.attention_prefill(*as_fp32(q, k, v), causal=causal, attention_mask=mask)
    assert rel_err(out, expected) < TOL[dtype]
    if causal and sq == sk:  # left-pad query rows see no key: exactly zero
        for i, n in enumerate(lengths):
            assert torch.all(out[i, :, : sk - n] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_strided_inputs_no_mask(dtype, prefill_kernel):
    """q/k/v as views of a [B, S, 3, H, D] projection, as a fused QKV layer produces them."""
    torch.manual_seed(11)
    b, s, h, d = 2, 150, 6, 64
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device=DEV)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = cb.attention_prefill(q, k, v, causal=True, scale=0.2)
    expected = ref.attention_prefill(*as_fp32(q, k, v), causal=True, scale=0.2)
    assert rel_err(out, expected) < TOL[dtype]


def test_prefill_uncovered_cases_fall_back(monkeypatch):
    monkeypatch.setattr(cb, "_warned", set())  # the warning is once per process
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 32, device=DEV)  # fp32 and head dim 32: no cuda kernel
    with pytest.warns(RuntimeWarning, match="attention_prefill"):
        out = cb.attention_prefill(q, q, q, causal=True)
    assert rel_err(out, ref.attention_prefill(q, q, q, causal=True)) < 1e-4


# ---------------------------------------------------------------- LoRA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n_in,n_out,r,bias", [
    ((1,), 1000, 1003, 8, True),      # decode, one token
    ((3, 1), 4096, 777, 16, False),   # decode, batch 3
    ((8,), 1024, 4099, 64, True),     # largest GEMV batch
    ((9,), 1000, 513, 8, True),       # just past the GEMV limit: cuBLAS path
    ((2, 37), 256, 300, 4, False),    # prefill shape
    ((5,), 1001, 64, 8, True),        # in not a vector multiple: cuBLAS path
])
def test_lora_linear_matches_reference(lead, n_in, n_out, r, bias, dtype):
    torch.manual_seed(n_in + n_out + r)
    x = torch.randn(*lead, n_in, dtype=dtype, device=DEV)
    w = torch.randn(n_out, n_in, dtype=dtype, device=DEV) / math.sqrt(n_in)
    b = torch.randn(n_out, dtype=dtype, device=DEV) if bias else None
    a = torch.randn(r, n_in, dtype=dtype, device=DEV) / math.sqrt(n_in)
    bb = torch.randn(n_out, r, dtype=dtype, device=DEV)
    with torch.no_grad():
        out = cb.lora_linear(x, w, b, a, bb, 0.5)
        no_lora = cb.lora_linear(x, w, b, None, None, 0.5)
    assert out.shape == (*lead, n_out)
    assert rel_err(out, ref.lora_linear(*as_fp32(x, w, b, a, bb), 0.5)) < TOL[dtype]
    assert rel_err(no_lora, ref.lora_linear(*as_fp32(x, w, b), None, None, 0.5)) < TOL[dtype]


def test_lora_linear_with_grad_is_differentiable():
    torch.manual_seed(1)
    x = torch.randn(2, 64, device=DEV, requires_grad=True)
    w = torch.randn(48, 64, device=DEV)
    a = torch.randn(4, 64, device=DEV, requires_grad=True)
    bb = torch.randn(48, 4, device=DEV, requires_grad=True)
    cb.lora_linear(x, w, None, a, bb, 2.0).sum().backward()
    for t in (x, a, bb):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_out,n_in,r", [(1003, 517, 8), (64, 4096, 300), (17, 33, 1)])
def test_lora_fuse_unfuse(n_out, n_in, r, dtype):
    torch.manual_seed(n_out + r)
    w = torch.randn(n_out, n_in, dtype=dtype, device=DEV)
    a = torch.randn(r, n_in, device=DEV) * 0.1   # fp32 factors with a low-precision base
    bb = torch.randn(n_out, r, device=DEV) * 0.1
    fused = cb.lora_fuse(w, a, bb, 0.75)
    expected = ref.lora_fuse(w, a, bb, 0.75)
    # Both round one fp32 value once; the fp32 values differ only by summation order
    # (a few fp32 eps of the operands' size), so the results are at most one ulp apart
    # plus that difference where W and the update nearly cancel.
    delta = (0.75 * bb.double() @ a.double()).abs()
    order = 4 * torch.finfo(torch.float32).eps * (w.double().abs() + delta)
    bound = torch.finfo(dtype).eps * expected.double().abs() + order
    assert not torch.isnan(fused).any()
    assert torch.all((fused.double() - expected.double()).abs() <= bound)
    # in place, and into a separate NaN-poisoned out
    target = torch.full_like(w, float("nan"))
    assert cb.lora_fuse(w, a, bb, 0.75, out=target) is target
    assert torch.equal(target, fused)
    inplace = w.clone()
    cb.lora_fuse(inplace, a, bb, 0.75, out=inplace)
    assert torch.equal(inplace, fused)
    back = cb.lora_unfuse(fused, a, bb, 0.75)
    assert rel_err(back, w) < TOL[dtype]


# ---------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 1000), (3, 5, 4096), (2, 1001), (1, 5120), (4, 24)])
@pytest.mark.parametrize("wdtype", ["same", "fp32", None])
def test_norms_match_reference(shape, dtype, wdtype):
    torch.manual_seed(shape[-1])
    n = shape[-1]
    x = torch.randn(*shape, dtype=dtype, device=DEV) * 3 + 1
    res = torch.randn(*shape, dtype=dtype, device=DEV)
    wd = dtype if wdtype == "same" else torch.float32
    w = None if wdtype is None else torch.randn(n, dtype=wd, device=DEV)
    b = None if wdtype is None else torch.randn(n, dtype=wd, device=DEV)
    y = cb.rms_norm(x, w, 1e-6)
    assert rel_err(y, ref.rms_norm(x.float(), None if w is None else w.float(), 1e-6)) < TOL[dtype]
    y, h = cb.rms_norm(x, w, 1e-6, residual=res)
    ey, eh = ref.rms_norm(x, w, 1e-6, residual=res)
    assert torch.equal(h, eh)  # x + residual rounded once, like the reference
    assert rel_err(y, ref.rms_norm(eh.float(), None if w is None else w.float(), 1e-6)) < TOL[dtype]
    y = cb.layer_norm(x, w, b, 1e-5)
    assert rel_err(y, ref.layer_norm(*as_fp32(x, w, b), 1e-5)) < TOL[dtype]
    y, h = cb.layer_norm(x, w, b, 1e-5, residual=res)
    assert torch.equal(h, eh)
    assert rel_err(y, ref.layer_norm(*as_fp32(eh, w, b), 1e-5)) < TOL[dtype]


# ---------------------------------------------------------------- rotary, KV cache
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hk,s,d,rd", [(8, 2, 37, 128, None), (6, 6, 5, 64, 32), (4, 1, 1, 80, 20)])
def test_rotary_in_place(hq, hk, s, d, rd, dtype):
    torch.manual_seed(s + d)
    b = 3
    half = (rd or d) // 2
    inv = 1.0 / (10000 ** (torch.arange(half, device=DEV).float() / half))
    ang = torch.arange(4096, device=DEV).float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    # q as a view of a [B, S, H, D] projection (strided), per-sequence offsets
    q = torch.randn(b, s, hq, d, dtype=dtype, device=DEV).transpose(1, 2)
    k = torch.randn(b, hk, s, d, dtype=dtype, device=DEV)
    pos = torch.arange(s, device=DEV)[None] + torch.tensor([0, 5, 4000 - s], device=DEV)[:, None]
    eq, ek = q.float().clone(), k.float().clone()
    ref.rotary(eq, ek, cos, sin, pos, rotary_dim=rd)
    q0, k0 = q.clone(), k.clone()
    rq, rk = cb.rotary(q, k, cos, sin, pos, rotary_dim=rd)
    assert rq is q and rk is k
    assert rel_err(q, eq) < TOL[dtype] and rel_err(k, ek) < TOL[dtype]
    r = rd or d
    assert torch.equal(q[..., r:], q0[..., r:]) and torch.equal(k[..., r:], k0[..., r:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 5])
def test_kv_cache_append(t, dtype):
    torch.manual_seed(t)
    b, h, smax, d = 4, 3, 50, 72
    kc = torch.randn(b, h, smax, d, dtype=dtype, device=DEV)
    vc = torch.randn(b, h, smax, d, dtype=dtype, device=DEV)
    k = torch.randn(b, t, h, d, dtype=dtype, device=DEV).transpose(1, 2)  # strided new tokens
    v = torch.randn(b, h, t, d, dtype=dtype, device=DEV)
    pos = torch.tensor([0, 7, 30, smax - t], device=DEV)
    ek, ev = kc.clone(), vc.clone()
    ref.kv_cache_append(ek, ev, k, v, pos)
    rk, rv = cb.kv_cache_append(kc, vc, k, v, pos)
    assert rk is kc and rv is vc
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


# ---------------------------------------------------------------- dispatch, graphs, compile
def test_dispatch_picks_cuda_backend():
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=DEV)
    name, _ = ops.resolve("attention_decode", q.device, "cuda")
    assert name == "cuda"


def test_cuda_graph_capture_of_decode_step():
    torch.manual_seed(5)
    b, hq, hkv, d, smax = 4, 16, 4, 128, 700
    dt = torch.bfloat16
    q = torch.randn(b, hq, d, dtype=dt, device=DEV)
    kc = torch.randn(b, hkv, smax, d, dtype=dt, device=DEV)
    vc = torch.randn(b, hkv, smax, d, dtype=dt, device=DEV)
    knew = torch.randn(b, hkv, 1, d, dtype=dt, device=DEV)
    lens = torch.tensor([10, 300, 699, 1], device=DEV)
    w = torch.randn(hq * d, dtype=dt, device=DEV)

    def step():
        cb.kv_cache_append(kc, vc, knew, knew, lens - 1)
        out = cb.attention_decode(q, kc, vc, lens)
        return cb.rms_norm(out.reshape(b, hq * d), w, 1e-6)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = step()
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([20, 5, 700, 2], device=DEV))
    g.replay()
    torch.cuda.synchronize()
    expected = step()
    assert torch.equal(static_out, expected)


def test_torch_compile_fullgraph_through_custom_ops():
    torch.manual_seed(9)
    b, hq, hkv, d, smax = 2, 8, 2, 64, 300
    dt = torch.float16
    kc = torch.randn(b, hkv, smax, d, dtype=dt, device=DEV)
    vc = torch.randn(b, hkv, smax, d, dtype=dt, device=DEV)
    lens = torch.tensor([300, 17], device=DEV)
    w = torch.randn(hq * d, dtype=dt, device=DEV)

    def f(q):
        out = cb.attention_decode(q, kc, vc, lens)
        return cb.rms_norm(out.reshape(b, -1), w, 1e-6)

    q = torch.randn(b, hq, d, dtype=dt, device=DEV)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(q), f(q))
