"""The paged KV-cache ops on a CUDA GPU, for every GPU backend that implements them: bf16 (which
the interpreter cannot check), production shapes, head dims 64-256, every option, batch
invariance, CUDA-graph capture of a decode step and torch.compile through the custom ops.

Ground truth: the torch reference on fp32 copies. Pools hold NaN in every row no sequence owns
and blocks come in shuffled order (tests/paged_cases.py); outputs are poisoned. Skipped
without CUDA (run by benchmarks/gpu_suite.sh).
"""
import pytest
import torch

from conftest import TOL, as_fp32, rel_err
from fastrlhf import ops
from fastrlhf.kernels._launch import poison_outputs
from fastrlhf.ops import reference as ref
from paged_cases import alibi, paged_case

pytestmark = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py

DEV = "cuda"
BACKENDS = ["triton", "cuda"]  # paged_attention_prefill: triton only (the cuda backend lists it as a fallback)


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setenv("FASTRLHF_CUDA_POISON", "1")  # the csrc/ kernels' outputs start as NaN
    with poison_outputs():
        yield


def _fn(backend, op):
    name, fn = ops.resolve(op, torch.device(DEV), backend)
    assert name == backend, f"{backend} does not run {op} here"
    return fn


def _opts(kind, hq):
    return {"plain": {}, "softcap": dict(softcap=30.0), "window": dict(window=1000),
            "alibi": dict(alibi_slopes=alibi(hq).to(DEV)),
            "all": dict(softcap=50.0, window=777, alibi_slopes=alibi(hq).to(DEV))}[kind]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,hq,hkv,max_len,d,bs,dtype,kind", [
    (32, 32, 8, 4500, 128, 16, torch.bfloat16, "plain"),
    (16, 16, 16, 2000, 80, 16, torch.bfloat16, "window"),
    (8, 16, 2, 1500, 96, 32, torch.bfloat16, "alibi"),
    (8, 8, 1, 1000, 256, 16, torch.bfloat16, "all"),
    (16, 32, 8, 3000, 64, 16, torch.float16, "softcap"),
])
def test_decode_matches_reference(backend, b, hq, hkv, max_len, d, bs, dtype, kind):
    g = torch.Generator().manual_seed(b + d)
    lens = torch.randint(1, max_len + 1, (b,), generator=g).tolist()
    lens[:3] = [max_len, bs, bs + 1]
    case = paged_case(lens, hq=hq, hkv=hkv, d=d, block_size=bs, dtype=dtype, seed=d, device=DEV)
    opts = _opts(kind, hq)
    out = _fn(backend, "paged_attention_decode")(*case.tensors(), case.seq_lens, **opts)
    q, kp, vp = as_fp32(case.q, case.k_pool, case.v_pool)
    expected = ref.paged_attention_decode(q, kp, vp, case.block_tables, case.seq_lens, **opts)
    assert rel_err(out, expected) < TOL[dtype]
    alone = _fn(backend, "paged_attention_decode")(case.q[1:2], case.k_pool, case.v_pool, case.block_tables[1:2],
                                                   case.seq_lens[1:2], **opts)
    assert torch.equal(alone, out[1:2])  # independent of the batch composition


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("hq,hkv,d,bs,dtype,kind", [
    (32, 8, 128, 16, torch.bfloat16, "plain"), (16, 2, 80, 16, torch.bfloat16, "all"),
    (8, 8, 256, 32, torch.bfloat16, "softcap"), (32, 8, 128, 16, torch.float16, "window")])
def test_prefill_and_extend_match_reference(backend, hq, hkv, d, bs, dtype, kind):
    lens, q_lens = [2048, 1500, 700, 33, 16, 0], [2048, 128, 1, 33, 5, 0]  # prefill, extends, decode-like
    case = paged_case(lens, q_lens=q_lens, hq=hq, hkv=hkv, d=d, block_size=bs, dtype=dtype, seed=d,
                      q_rows=sum(q_lens) + 3, device=DEV)
    opts = _opts(kind, hq)
    out = _fn(backend, "paged_attention_prefill")(*case.tensors(), case.cu_q_lens, case.seq_lens, **opts)
    q, kp, vp = as_fp32(case.q, case.k_pool, case.v_pool)
    expected = ref.paged_attention_prefill(q, kp, vp, case.block_tables, case.cu_q_lens, case.seq_lens, **opts)
    assert rel_err(out, expected) < TOL[dtype]
    assert torch.all(out[sum(q_lens):] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kv_append_matches_reference(backend, dtype):
    torch.manual_seed(1)
    hkv, d, bs = 8, 128, 16
    pools = [torch.full((300, hkv, bs, d), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
    slots = torch.randperm(300 * bs, device=DEV)[:1000].to(torch.int32)
    slots[::7] = -1  # padding rows
    k = torch.randn(1000, hkv, d, device=DEV).to(dtype)
    v = torch.randn(1000, hkv, d, device=DEV).to(dtype)
    ref.paged_kv_append(pools[0], pools[1], k, v, slots)
    _fn(backend, "paged_kv_append")(pools[2], pools[3], k, v, slots)
    assert torch.equal(pools[0].nan_to_num(3.0), pools[2].nan_to_num(3.0))
    assert torch.equal(pools[1].nan_to_num(3.0), pools[3].nan_to_num(3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_of_a_paged_decode_step(backend):
    """append + decode captured once, replayed with new inputs and longer sequences (static
    shapes: rows x table width), equals eager calls."""
    case = paged_case([300, 41, 1, 1000], hq=16, hkv=4, d=128, block_size=16, dtype=torch.bfloat16,
                      extra_columns=8, seed=2, device=DEV)
    kp, vp = case.k_pool.nan_to_num(), case.v_pool.nan_to_num()
    q, lens = case.q.clone(), case.seq_lens.clone()
    new_k = torch.zeros(4, 4, 128, dtype=torch.bfloat16, device=DEV)
    slots = torch.zeros(4, dtype=torch.int32, device=DEV)
    append, decode = _fn(backend, "paged_kv_append"), _fn(backend, "paged_attention_decode")

    def step():
        append(kp, vp, new_k, new_k, slots)
        return decode(q, kp, vp, case.block_tables, lens)

    step()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        lens += 1
        slots.copy_(ops.paged_slot_mapping(case.block_tables, torch.arange(5, device=DEV, dtype=torch.int32),
                                           lens, 16, 4))
        q.copy_(torch.randn_like(q))
        new_k.copy_(torch.randn_like(new_k))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode(q, kp, vp, case.block_tables, lens))


def test_torch_compile_fullgraph_through_the_triton_paged_ops():
    case = paged_case([100, 7], q_lens=[100, 3], hq=8, hkv=2, d=64, block_size=16, dtype=torch.bfloat16,
                      seed=3, device=DEV)
    from fastrlhf.ops import triton_backend as tb

    def f(q):
        return tb.paged_attention_prefill(q, case.k_pool, case.v_pool, case.block_tables, case.cu_q_lens,
                                          case.seq_lens) * 2

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(case.q), f(case.q))


def test_cuda_backend_routes_prefill_and_unaligned_pools_to_triton(monkeypatch):
    from fastrlhf.ops import cuda_backend as cb, dispatch

    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(cb, "_warned", set())
    assert ops.resolve("paged_attention_prefill", torch.device(DEV))[0] == "triton"
    case = paged_case([50, 3], hq=4, hkv=2, d=100, block_size=16, dtype=torch.bfloat16, seed=4, device=DEV)
    with pytest.warns(RuntimeWarning, match="head dim 100"):
        out = cb.paged_attention_decode(*case.tensors(), case.seq_lens)
    q, kp, vp = as_fp32(case.q, case.k_pool, case.v_pool)
    assert rel_err(out, ref.paged_attention_decode(q, kp, vp, case.block_tables, case.seq_lens)) < TOL[torch.bfloat16]
