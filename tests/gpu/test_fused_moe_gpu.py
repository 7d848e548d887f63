"""The fused MoE kernel and the MoE engine on a CUDA GPU: bf16 (which the CPU interpreter cannot
check) on published layer shapes against the fp32 reference (outputs poisoned first), CUDA-graph
capture of the kernel (its grid and buffers depend only on the shapes), and a MoE model's
generation on the GPU. Skipped without CUDA (run by the GPU suite)."""
import pytest
import torch

from conftest import TOL, build_tiny, left_padded_batch
from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from fastrlhf.kernels._launch import poison_outputs
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb

pytestmark = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py
DEV = "cuda"


def _inputs(t, h, i, e, k, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(DEV, dtype)
    gu = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(DEV, dtype)
    dn = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(DEV, dtype)
    w, ids = torch.softmax(torch.randn(t, e, generator=g), -1).topk(k, -1)
    return x, ids.to(DEV), w.to(DEV), gu, dn


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# (T, H, I, E, k): Qwen3-30B-A3B decode batch 64 and a prefill; OLMoE; Mixtral-shaped (narrower I);
# odd T and widths
@pytest.mark.parametrize("t,h,i,e,k,dtype", [
    (64, 2048, 768, 128, 8, torch.bfloat16), (1000, 2048, 768, 128, 8, torch.bfloat16),
    (77, 2048, 1024, 64, 8, torch.bfloat16), (333, 4096, 2048, 8, 2, torch.bfloat16),
    (129, 1000, 333, 60, 4, torch.float16), (1, 2048, 768, 128, 8, torch.bfloat16)])
def test_fused_moe_large(t, h, i, e, k, dtype):
    x, ids, w, gu, dn = _inputs(t, h, i, e, k, dtype, seed=t)
    with poison_outputs():
        out = tb.fused_moe(x, ids, w, gu, dn)
    exp = ref.fused_moe(x.float(), ids, w, gu.float(), dn.float())
    same_dtype = ref.fused_moe(x, ids, w, gu, dn)
    assert torch.isfinite(out).all()
    assert _rel(out, exp) <= 2 * _rel(same_dtype, exp) + TOL[dtype] / 4, (_rel(out, exp), _rel(same_dtype, exp))


def test_fused_moe_replays_in_a_cuda_graph():
    x, ids, w, gu, dn = _inputs(64, 512, 256, 32, 4, torch.bfloat16, seed=3)
    tb.fused_moe(x, ids, w, gu, dn)  # compile / autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tb.fused_moe(x, ids, w, gu, dn)
    new = _inputs(64, 512, 256, 32, 4, torch.bfloat16, seed=4)
    for dst, src in zip((x, ids, w), new[:3]):
        dst.copy_(src)  # other tokens, other routing: the same grid and buffers
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out, ref.fused_moe(x.float(), ids, w, gu.float(), dn.float())) < 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_moe_engine_on_gpu_equals_hf(name, tmp_path):
    model = build_tiny(name, tmp_path).to(DEV)
    ids, mask = left_padded_batch([5, 11, 3], pad_id=0, seed=9)
    ids, mask = ids.to(DEV), mask.to(DEV)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for graphs in (True, False):
        ours = HybridEngine(model, None, EngineConfig(cuda_graphs=graphs)).generate(ids, mask, **kw).sequences
        ref_seq = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(ours, ref_seq), (name, graphs)
