"""The paged KV-cache Triton kernels compile for sm_90 (H100/H200) without a GPU, in bf16 (which
the interpreter cannot check) and the other dtypes, with every option, and fit the per-block
shared memory. Numerics are the interpreter tests' (test_paged_triton.py) and the GPU tests' job.
"""
import pytest
import torch

from fastrlhf.kernels._launch import compile_only
from fastrlhf.ops import triton_backend as tb
from paged_cases import alibi, paged_case

H100_SMEM_PER_BLOCK = 232448  # bytes of shared memory one block may use on sm_90


@pytest.mark.parametrize("dtype,d,bs,options", [
    (torch.bfloat16, 128, 16, "all"),     # the production case: every prefill autotune config
    (torch.bfloat16, 80, 16, "alibi"),
    (torch.float16, 256, 32, "softcap+window"),
], ids=["bf16-d128-all", "bf16-d80-alibi", "fp16-d256"])
def test_paged_kernels_compile_for_sm90(dtype, d, bs, options):
    hq, hkv = 8, 2
    case = paged_case([40, 3], q_lens=[40, 2], hq=hq, hkv=hkv, d=d, block_size=bs, dtype=dtype)
    opts = {"all": dict(softcap=30.0, window=64, alibi_slopes=alibi(hq)),
            "softcap+window": dict(softcap=50.0, window=4096), "alibi": dict(alibi_slopes=alibi(hq))}[options]
    slots = torch.arange(case.q.shape[0], dtype=torch.int32)
    kv = torch.randn(case.q.shape[0], hkv, d).to(dtype)
    with compile_only(90, all_configs=options == "all") as rec:
        tb.paged_attention_decode(case.q[:2], case.k_pool, case.v_pool, case.block_tables, case.seq_lens, **opts)
        tb.paged_attention_prefill(*case.tensors(), case.cu_q_lens, case.seq_lens, **opts)
        tb.paged_kv_append(case.k_pool, case.v_pool, kv, kv, slots)
    names = [r[0] for r in rec.compiled]
    assert set(names) == {"_paged_decode_partial_kernel", "_paged_decode_reduce_kernel", "_paged_prefill_kernel",
                          "_paged_append_kernel"}
    if options == "all":
        assert names.count("_paged_prefill_kernel") == 3  # every autotune candidate compiles
        assert all(r[1]["SOFTCAP"] and r[1]["HAS_WINDOW"] and r[1]["HAS_ALIBI"]
                   for r in rec.compiled if r[0] == "_paged_prefill_kernel")
    for name in set(names):
        assert min(r[2] for r in rec.compiled if r[0] == name) <= H100_SMEM_PER_BLOCK, rec.compiled
