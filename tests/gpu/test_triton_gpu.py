"""The triton backend on a CUDA GPU: bf16 (which the CPU interpreter cannot check), large
shapes, head dims 80/96/256, CUDA-graph capture and torch.compile through the custom ops.

Ground truth is the torch reference evaluated on fp32 copies of the inputs; outputs are
NaN-poisoned first. Skipped without CUDA (run by the GPU suite).
"""
import math

import pytest
import torch

from conftest import TOL, as_fp32, left_pad_mask, rel_err
from fastrlhf.kernels._launch import poison_outputs
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb

pytestmark = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py

DEV = "cuda"


# bf16 over the shapes, fp16 on one (each new dtype/head-dim/group is an autotuning session)
@pytest.mark.parametrize("seq,hq,hkv,d,dtype", [
    (2048, 32, 8, 128, torch.bfloat16), (1000, 16, 16, 80, torch.bfloat16),
    (777, 16, 2, 96, torch.bfloat16), (513, 8, 1, 256, torch.bfloat16),
    (4096, 32, 8, 128, torch.bfloat16), (2048, 32, 8, 128, torch.float16)])
def test_prefill_large(seq, hq, hkv, d, dtype):
    torch.manual_seed(seq + d)
    b = 2
    q = torch.randn(b, hq, seq, d, dtype=dtype, device=DEV)
    k = torch.randn(b, hkv, seq, d, dtype=dtype, device=DEV)
    v = torch.randn(b, hkv, seq, d, dtype=dtype, device=DEV)
    mask = left_pad_mask([seq, seq // 3], seq, device=DEV)
    with poison_outputs():
        out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask)
    expected = ref.attention_prefill(*as_fp32(q, k, v), causal=True, attention_mask=mask)
    assert rel_err(out, expected) < TOL[dtype]
    assert torch.all(out[1, :, : seq - seq // 3] == 0)


@pytest.mark.parametrize("b,hq,hkv,smax,d,dtype", [
    (16, 32, 8, 4500, 128, torch.bfloat16), (3, 8, 8, 300, 64, torch.bfloat16),
    (32, 64, 8, 2048, 128, torch.bfloat16), (16, 32, 8, 4500, 128, torch.float16)])
def test_decode_large(b, hq, hkv, smax, d, dtype):
    torch.manual_seed(b + smax)
    q = torch.randn(b, hq, d, dtype=dtype, device=DEV)
    kc = torch.randn(b, hkv, smax, d, dtype=dtype, device=DEV)
    vc = torch.randn(b, hkv, smax, d, dtype=dtype, device=DEV)
    lens = torch.randint(1, smax + 1, (b,), device=DEV)
    starts = (torch.rand(b, device=DEV) * lens).long()
    with poison_outputs():
        out = tb.attention_decode(q, kc, vc, lens, cache_starts=starts)
    expected = ref.attention_decode(*as_fp32(q, kc, vc), lens, cache_starts=starts)
    assert rel_err(out, expected) < TOL[dtype]
    alone = tb.attention_decode(q[1:2], kc[1:2], vc[1:2], lens[1:2], cache_starts=starts[1:2])
    assert torch.equal(alone, out[1:2])  # independent of the batch composition


@pytest.mark.parametrize("seq,hq,hkv,d,dtype", [
    (1000, 8, 2, 256, torch.bfloat16), (777, 16, 4, 128, torch.bfloat16), (130, 8, 8, 64, torch.bfloat16),
    (1000, 8, 2, 256, torch.float16)])
def test_attention_softcap_bf16(seq, hq, hkv, d, dtype):
    """Gemma2's attention logit softcapping (cap 50, head dim 256 as in Gemma2; a small cap of 2 on
    large-norm q/k on the other shapes, where the cap visibly changes the result)."""
    torch.manual_seed(seq + hq)
    cap, amp = (50.0, 1.0) if d == 256 else (2.0, 3.0)
    b = 2
    q = (torch.randn(b, hq, seq, d, device=DEV) * amp).to(dtype)
    k = (torch.randn(b, hkv, seq, d, device=DEV) * amp).to(dtype)
    v = torch.randn(b, hkv, seq, d, dtype=dtype, device=DEV)
    mask = left_pad_mask([seq, seq // 3], seq, device=DEV)
    with poison_outputs():
        out = tb.attention_prefill(q, k, v, causal=True, attention_mask=mask, softcap=cap)
    expected = ref.attention_prefill(*as_fp32(q, k, v), causal=True, attention_mask=mask, softcap=cap)
    assert rel_err(out, expected) < TOL[dtype]
    assert torch.all(out[1, :, : seq - seq // 3] == 0)
    if cap == 2.0:
        uncapped = ref.attention_prefill(*as_fp32(q, k, v), causal=True, attention_mask=mask)
        assert rel_err(uncapped, expected) > 0.1
    lens = torch.tensor([seq, seq], device=DEV)
    starts = torch.tensor([0, seq - seq // 3], device=DEV)
    with poison_outputs():
        dec = tb.attention_decode(q[:, :, -1], k, v, lens, cache_starts=starts, softcap=cap)
    dec_expected = ref.attention_decode(*as_fp32(q[:, :, -1], k, v), lens, cache_starts=starts, softcap=cap)
    assert rel_err(dec, dec_expected) < TOL[dtype]


def test_decode_under_cuda_graph_and_kv_append():
    torch.manual_seed(0)
    b, hq, hkv, smax, d = 8, 16, 4, 1024, 128
    kc = torch.zeros(b, hkv, smax, d, dtype=torch.bfloat16, device=DEV)
    vc = torch.zeros_like(kc)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=DEV)
    k_new = torch.randn(b, hkv, 1, d, dtype=torch.bfloat16, device=DEV)
    v_new = torch.randn_like(k_new)
    pos = torch.zeros(b, dtype=torch.long, device=DEV)

    def step():
        tb.kv_cache_append(kc, vc, k_new, v_new, pos)
        return tb.attention_decode(q, kc, vc, pos + 1)

    step()  # warm up: compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in range(5):
        pos.fill_(t * 37)
        k_new.normal_()
        v_new.normal_()
        q.normal_()
        graph.replay()
        expected = ref.attention_decode(*as_fp32(q, kc, vc), pos + 1)
        assert rel_err(out, expected) < TOL[torch.bfloat16]
        assert torch.equal(kc[:, :, t * 37], k_new[:, :, 0])


def test_torch_compile_sees_through_the_custom_ops():
    torch.manual_seed(1)
    q = torch.randn(2, 8, 64, 64, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(2, 2, 64, 64, dtype=torch.bfloat16, device=DEV)
    w = torch.randn(64, dtype=torch.bfloat16, device=DEV)

    def block(q, k):
        attn = tb.attention_prefill(q, k, k, causal=True)
        return tb.rms_norm(attn, w, 1e-6)

    compiled = torch.compile(block, fullgraph=True)
    assert rel_err(compiled(q, k), block(q, k)) < 1e-3


@pytest.mark.parametrize("rows", [16, 4096])
@pytest.mark.parametrize("rank", [16, 64])
def test_lora_linear_bf16_forward_backward(rows, rank):
    torch.manual_seed(rows + rank)
    fin, fout = 4096, 4096 + 7
    x = torch.randn(rows, fin, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    w = (torch.randn(fout, fin, device=DEV) / math.sqrt(fin)).bfloat16()
    a = (torch.randn(rank, fin, device=DEV) / math.sqrt(fin)).bfloat16().requires_grad_()
    bm = torch.randn(fout, rank, dtype=torch.bfloat16, device=DEV).requires_grad_()
    out = tb.lora_linear(x, w, None, a, bm, 0.5)
    expected = ref.lora_linear(*as_fp32(x, w, None, a, bm), 0.5)
    assert rel_err(out, expected) < TOL[torch.bfloat16]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, a, bm], g)
    xf, af, bf = [t.detach().float().requires_grad_() for t in (x, a, bm)]
    exp = torch.autograd.grad(ref.lora_linear(xf, w.float(), None, af, bf, 0.5), [xf, af, bf], g.float())
    for gg, e in zip(got, exp):
        assert rel_err(gg, e) < 2 * TOL[torch.bfloat16]


def test_lora_fuse_unfuse_bf16_in_place():
    torch.manual_seed(2)
    w = torch.randn(4096, 4096 + 3, dtype=torch.bfloat16, device=DEV)
    a = torch.randn(32, 4096 + 3, dtype=torch.bfloat16, device=DEV) * 0.02
    bm = torch.randn(4096, 32, dtype=torch.bfloat16, device=DEV) * 0.02
    expected = ref.lora_fuse(w, a, bm, 2.0)
    fused = w.clone()
    tb.lora_fuse(fused, a, bm, 2.0, out=fused)
    ulp = torch.finfo(torch.bfloat16).eps
    assert ((fused.float() - expected.float()).abs() <= ulp * expected.float().abs() + 1e-30).float().mean() > 0.999
    assert rel_err(tb.lora_unfuse(fused, a, bm, 2.0), w) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_and_rotary_bf16_large(dtype):
    torch.manual_seed(3)
    x = torch.randn(4, 1000, 8192, dtype=dtype, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(8192, dtype=dtype, device=DEV)
    with poison_outputs():
        y, h = tb.rms_norm(x, w, 1e-6, r)
        z = tb.layer_norm(x, w, w, 1e-5)
    ye, he = ref.rms_norm(x, w, 1e-6, r)
    assert torch.equal(h, he) and rel_err(y, ye) < TOL[dtype]
    assert rel_err(z, ref.layer_norm(x, w, w, 1e-5)) < TOL[dtype]
    q = torch.randn(4, 32, 700, 128, dtype=dtype, device=DEV)
    k = torch.randn(4, 8, 700, 128, dtype=dtype, device=DEV)
    ang = torch.arange(4096, device=DEV).float()[:, None] / (10000 ** (torch.arange(0, 64, device=DEV).float() / 64))
    pos = torch.arange(700, device=DEV)[None].repeat(4, 1) + torch.tensor([[0], [9], [100], [3000]], device=DEV)
    qr, kr = q.clone(), k.clone()
    ref.rotary(qr, kr, ang.cos(), ang.sin(), pos)
    tb.rotary(q, k, ang.cos(), ang.sin(), pos)
    assert rel_err(q, qr) < TOL[dtype] and rel_err(k, kr) < TOL[dtype]


# ------------------------------------------------------------------ backward (bf16, large shapes)
def _attention_grads(fn, q, k, v, grad, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(fn(*leaves, **kw), leaves, grad)


@pytest.mark.parametrize("b,seq,hq,hkv,d,dtype,softcap", [
    (2, 2048, 32, 8, 128, torch.bfloat16, None), (2, 1000, 16, 16, 80, torch.bfloat16, None),
    (2, 777, 12, 2, 96, torch.bfloat16, None), (2, 513, 8, 1, 256, torch.bfloat16, 50.0),
    (2, 1031, 16, 4, 64, torch.float16, 2.0)])
def test_attention_backward_large(b, seq, hq, hkv, d, dtype, softcap):
    """dq, dk, dv against fp32 autograd of the reference, with left padding, GQA, softcap; at most
    about twice the error of the same computation done by PyTorch in the same dtype; and
    bit-identical when run again (no atomics)."""
    torch.manual_seed(seq + d)
    amp = 3.0 if softcap == 2.0 else 1.0
    q = (torch.randn(b, hq, seq, d, device=DEV) * amp).to(dtype)
    k = (torch.randn(b, hkv, seq, d, device=DEV) * amp).to(dtype)
    v = torch.randn(b, hkv, seq, d, dtype=dtype, device=DEV)
    grad = torch.randn(b, hq, seq, d, dtype=dtype, device=DEV)
    mask = left_pad_mask([seq, seq // 3], seq, device=DEV)
    kw = dict(causal=True, attention_mask=mask, softcap=softcap)
    with poison_outputs():
        got = _attention_grads(tb.attention_prefill, q, k, v, grad, **kw)
        again = _attention_grads(tb.attention_prefill, q, k, v, grad, **kw)
    expected = _attention_grads(ref.attention_prefill, *as_fp32(q, k, v), grad.float(), **kw)
    same_dtype = _attention_grads(ref.attention_prefill, q, k, v, grad, **kw)
    for g, a, e, s in zip(got, again, expected, same_dtype):
        assert torch.equal(g, a)
        assert rel_err(g, e) < max(2 * TOL[dtype], 2 * rel_err(s, e))
    assert torch.all(got[0][1, :, : seq - seq // 3] == 0)  # pad query rows see no key
    assert torch.all(got[1][1, :, : seq - seq // 3] == 0)  # pad keys are never seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_backward_large(dtype):
    torch.manual_seed(4)
    x = torch.randn(4, 1000, 4096, dtype=dtype, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(4096, dtype=dtype, device=DEV)
    bias = torch.randn(4096, dtype=dtype, device=DEV)
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    for is_rms in (True, False):
        def run(mod, x, r, w, bias):
            leaves = [t.detach().requires_grad_() for t in (x, r, w, bias)]
            if is_rms:
                outs = mod.rms_norm(leaves[0], leaves[2], 1e-6, leaves[1])
                leaves = leaves[:3]
            else:
                outs = mod.layer_norm(leaves[0], leaves[2], leaves[3], 1e-5, leaves[1])
            return torch.autograd.grad(outs, leaves, [gy.to(x.dtype), gh.to(x.dtype)])
        with poison_outputs():
            got = run(tb, x, r, w, bias)
            again = run(tb, x, r, w, bias)
        expected = run(ref, *as_fp32(x, r, w, bias))
        for g, a, e in zip(got, again, expected):
            assert torch.equal(g, a), "weight gradients must be bit-reproducible"
            assert rel_err(g, e) < 2 * TOL[dtype]


def test_torch_compile_sees_through_the_backward_ops():
    torch.manual_seed(6)
    q = torch.randn(2, 8, 128, 64, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    k = torch.randn(2, 2, 128, 64, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    w = torch.randn(64, dtype=torch.bfloat16, device=DEV, requires_grad=True)

    def block(q, k, w):
        return tb.rms_norm(tb.attention_prefill(q, k, k, causal=True), w, 1e-6).float().square().sum()

    eager = torch.autograd.grad(block(q, k, w), [q, k, w])
    compiled = torch.autograd.grad(torch.compile(block, fullgraph=True)(q, k, w), [q, k, w])
    for c, e in zip(compiled, eager):
        assert rel_err(c, e) < 1e-3


@pytest.mark.parametrize("n,h,v", [(1000, 896, 151936), (257, 128, 5003)])
def test_token_logprobs_bf16_forward_backward(n, h, v):
    """Fused log-probs and entropy (bf16 logits chunk, fp32 statistics) against the fp32 reference,
    values and both gradients; ignored rows (-100) are exactly zero."""
    torch.manual_seed(n)
    hidden = torch.randn(n, h, device=DEV).bfloat16()
    weight = (torch.randn(v, h, device=DEV) / math.sqrt(h)).bfloat16()
    targets = torch.randint(0, v, (n,), device=DEV)
    targets[::5] = -100
    g_logp, g_ent = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    got, exp = [], []
    for fn, dtype, out in ((tb.token_logprobs, torch.bfloat16, got), (ref.token_logprobs, torch.float32, exp)):
        hh = hidden.to(dtype).requires_grad_()
        ww = weight.to(dtype).requires_grad_()
        with poison_outputs():
            logp, ent = fn(hh, ww, targets, temperature=0.9, return_entropy=True)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        out += [logp, ent, hh.grad, ww.grad]
    for a, b in zip(got, exp):
        assert rel_err(a, b) < 2 * TOL[torch.bfloat16]
    assert torch.all(got[0][targets < 0] == 0) and torch.all(got[2][targets < 0] == 0)
