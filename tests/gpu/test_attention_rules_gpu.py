"""Sliding window, ALiBi and packed sequences in the triton attention kernels on a CUDA GPU: bf16
(which the CPU interpreter cannot check), production shapes, forward and backward, decode under a
CUDA graph, and the cuda backend's routing of these calls.

Ground truth: the torch reference on fp32 copies (gradients: float64 autograd of it on smaller
shapes). Outputs are NaN-poisoned. Skipped without CUDA (run by benchmarks/gpu_suite.sh, stage
gpu_tests_attention_rules).
"""
import pytest
import torch

from conftest import TOL, as_fp32, left_pad_mask, rel_err
from fastrlhf import ops
from fastrlhf.kernels._launch import poison_outputs
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb

pytestmark = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py

DEV = "cuda"


def _qkv(b, hq, hkv, sq, sk, d, dtype, seed, amp=1.0):
    torch.manual_seed(seed)
    q = (torch.randn(b, hq, sq, d, device=DEV) * amp).to(dtype)
    k = (torch.randn(b, hkv, sk, d, device=DEV) * amp).to(dtype)
    v = torch.randn(b, hkv, sk, d, device=DEV).to(dtype)
    return q, k, v


def _slopes(hq):
    """Bloom's slopes for hq heads (a power of two here): 2^(-8 i / hq)."""
    return torch.tensor([2 ** (-8 * (i + 1) / hq) for i in range(hq)], device=DEV)


@pytest.mark.parametrize("seq,hq,hkv,d,window,alibi,dtype", [
    (4096, 32, 8, 128, 1024, False, torch.bfloat16), (2000, 16, 2, 128, 777, True, torch.bfloat16),
    (1000, 8, 4, 256, 333, False, torch.bfloat16), (1500, 16, 16, 64, None, True, torch.bfloat16),
    (2048, 32, 8, 128, 500, True, torch.float16)])
def test_prefill_window_alibi_large(seq, hq, hkv, d, window, alibi, dtype):
    q, k, v = _qkv(2, hq, hkv, seq, seq, d, dtype, seed=seq + d)
    mask = left_pad_mask([seq, seq // 3], seq, device=DEV)
    kw = dict(attention_mask=mask, window=window, alibi_slopes=_slopes(hq) if alibi else None)
    with poison_outputs():
        out = tb.attention_prefill(q, k, v, **kw)
    assert rel_err(out, ref.attention_prefill(*as_fp32(q, k, v), **kw)) < TOL[dtype]
    assert torch.all(out[1, :, : seq - seq // 3] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_prefill_large(dtype):
    torch.manual_seed(3)
    lengths = [1, 700, 129, 1, 2048, 64, 333]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    t = int(cu[-1]) + 17  # tokens after the last boundary
    q, k, v = _qkv(1, 32, 8, t, t, 128, dtype, seed=4)
    with poison_outputs():
        out = tb.attention_prefill(q, k, v, cu_seqlens=cu)
    assert rel_err(out, ref.attention_prefill(*as_fp32(q, k, v), cu_seqlens=cu)) < TOL[dtype]
    assert torch.all(out[:, :, int(cu[-1]):] == 0)
    lo = int(cu[4])  # the 2048-token sequence equals its unpacked attention
    alone = tb.attention_prefill(q[:, :, lo:lo + 2048], k[:, :, lo:lo + 2048], v[:, :, lo:lo + 2048])
    assert rel_err(out[:, :, lo:lo + 2048], alone) < TOL[dtype]


# (b, hq, hkv, s, d, window, alibi, packed)
BACKWARD = [(2, 16, 4, 1000, 128, 300, True, False), (1, 16, 4, 1500, 128, None, False, True),
            (1, 8, 2, 1200, 64, 200, True, True)]


@pytest.mark.parametrize("case", BACKWARD)
def test_backward_window_alibi_packed_bf16(case):
    b, hq, hkv, s, d, window, alibi, packed = case
    dtype = torch.bfloat16
    q, k, v = _qkv(b, hq, hkv, s, s, d, dtype, seed=s)
    kw = dict(window=window, alibi_slopes=_slopes(hq) if alibi else None,
              cu_seqlens=torch.tensor([0, 1, s // 3, s // 3 + 1, s - 5], dtype=torch.int32, device=DEV)
              if packed else None,
              attention_mask=None if packed else left_pad_mask([s, s // 2], s, device=DEV))
    grad = torch.randn(b, hq, s, d, device=DEV).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poison_outputs():
        got = torch.autograd.grad(tb.attention_prefill(*leaves, **kw), leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(ref.attention_prefill(*leaves64, **kw), leaves64, grad.double())
    for name, g, e in zip("qkv", got, expected):
        assert rel_err(g, e) < TOL[dtype], f"d{name}: {rel_err(g, e):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_window_alibi_large_and_under_cuda_graph(dtype):
    torch.manual_seed(5)
    b, hq, hkv, smax, d, window = 16, 32, 8, 4500, 128, 1024
    q = torch.randn(b, hq, d, device=DEV).to(dtype)
    kc, vc = (torch.randn(b, hkv, smax, d, device=DEV).to(dtype) for _ in range(2))
    lens = torch.randint(1, smax + 1, (b,), device=DEV)
    starts = (torch.rand(b, device=DEV) * lens).long()
    kw = dict(cache_starts=starts, window=window, alibi_slopes=_slopes(hq))
    with poison_outputs():
        out = tb.attention_decode(q, kc, vc, lens, **kw)
    assert rel_err(out, ref.attention_decode(*as_fp32(q, kc, vc), lens, **kw)) < TOL[dtype]
    alone = tb.attention_decode(q[1:2], kc[1:2], vc[1:2], lens[1:2], cache_starts=starts[1:2], window=window,
                                alibi_slopes=_slopes(hq))
    assert torch.equal(alone, out[1:2])  # independent of the batch composition
    static_out = torch.empty_like(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(tb.attention_decode(q, kc, vc, lens, **kw))
    lens.sub_(1)  # a replay reads the new lengths (the window moves with them)
    graph.replay()
    assert torch.equal(static_out, tb.attention_decode(q, kc, vc, lens, **kw))


def test_cuda_backend_runs_decode_windows_and_routes_the_rest():
    from fastrlhf.ops import cuda_backend as cb
    ok, why = cb.load_extension()
    assert ok, f"the CUDA extension did not build/load: {why}"  # on a GPU it must (as test_cuda_ops)
    torch.manual_seed(6)
    q = torch.randn(8, 32, 128, device=DEV, dtype=torch.bfloat16)
    kc, vc = (torch.randn(8, 8, 3000, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.randint(1, 3001, (8,), device=DEV)
    out = ops.attention_decode(q, kc, vc, lens, window=700, backend="cuda")
    assert rel_err(out, ref.attention_decode(*as_fp32(q, kc, vc), lens, window=700)) < TOL[torch.bfloat16]
    qp, kp, vp = _qkv(1, 32, 8, 900, 900, 128, torch.bfloat16, seed=7)
    cu = torch.tensor([0, 400, 900], dtype=torch.int32, device=DEV)
    out = ops.attention_prefill(qp, kp, vp, cu_seqlens=cu, window=128, backend="cuda")
    expected = ref.attention_prefill(*as_fp32(qp, kp, vp), cu_seqlens=cu, window=128)
    assert rel_err(out, expected) < TOL[torch.bfloat16]
