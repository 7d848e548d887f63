"""The paged KV-cache Triton kernels (kernels/paged_attention.py) under the Triton interpreter,
against the contract evaluated in float64 (tests/paged_cases.py).

Every case hands out pool blocks in shuffled order, fills every pool row no sequence owns with
NaN (free blocks, the tails of last blocks, a block named by a table entry past a sequence's
end) and poisons the outputs, so a kernel that reads or skips what it should not fails.
fp32/fp16 only (the interpreter's bf16 tl.dot is wrong; bf16 is in tests/gpu). Small shapes:
the interpreter runs every program in Python.
"""
import pytest
import torch

from conftest import TOL, rel_err
from fastrlhf import ops
from fastrlhf.kernels import paged_attention as paged_kernels
from fastrlhf.kernels._launch import poison_outputs
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb
from paged_cases import alibi, naive_attention, paged_case


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with poison_outputs():
        yield


def _check(out, case, *, decode, dtype, **opts):
    expected = naive_attention(case, decode=decode, **opts)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert rel_err(out, expected) < TOL[dtype]
    return expected


# (hq, hkv, head dim, block size, dtype, options): GQA, MQA and MHA; head dims 64-256 with 80/96;
# every option alone and together
CASES = [
    (4, 2, 64, 16, torch.float32, dict()),
    (8, 1, 80, 16, torch.float16, dict(softcap=2.0)),
    (4, 4, 96, 8, torch.float32, dict(window=37)),
    (6, 2, 128, 16, torch.float16, dict(alibi_slopes=alibi(6))),
    (2, 1, 256, 32, torch.float32, dict(softcap=3.0, window=300, alibi_slopes=alibi(2), scale=0.05)),
]
IDS = ["gqa-d64", "mqa-d80-softcap", "mha-d96-window", "gqa-d128-alibi", "d256-all"]


@pytest.mark.parametrize("hq,hkv,d,bs,dtype,opts", CASES, ids=IDS)
def test_decode_matches_float64_contract(hq, hkv, d, bs, dtype, opts):
    # one token, one block, block boundaries k*bs and k*bs +- 1, an empty row, and past one
    # 256-key split (the window of 300 then spans a split boundary)
    lens = [1, bs, bs + 1, 3 * bs - 1, 3 * bs, 0, 300]
    case = paged_case(lens, hq=hq, hkv=hkv, d=d, block_size=bs, dtype=dtype, seed=d + bs, amp=2.0)
    out = tb.paged_attention_decode(*case.tensors(), case.seq_lens, **opts)
    _check(out, case, decode=True, dtype=dtype, **opts)
    assert torch.all(out[5] == 0)


@pytest.mark.parametrize("hq,hkv,d,bs,dtype,opts", CASES, ids=IDS)
def test_prefill_and_extend_match_float64_contract(hq, hkv, d, bs, dtype, opts):
    # a full prefill across blocks, extends of several tokens and of one (decode-like), a
    # one-block sequence, an empty one, and two padding rows after cu_q_lens[B]
    lens, q_lens = [3 * bs + 1, 2 * bs, 41, bs, 0, 5], [3 * bs + 1, 7, 1, bs, 0, 5]
    case = paged_case(lens, q_lens=q_lens, hq=hq, hkv=hkv, d=d, block_size=bs, dtype=dtype, seed=d,
                      amp=2.0, q_rows=sum(q_lens) + 2)
    out = tb.paged_attention_prefill(*case.tensors(), case.cu_q_lens, case.seq_lens, **opts)
    _check(out, case, decode=False, dtype=dtype, **opts)
    assert torch.all(out[sum(q_lens):] == 0)


def test_prefill_max_q_len_hint_smaller_than_a_sequence_only_loops():
    """Programs take a sequence's query tiles in turn, so an underestimated hint is still right."""
    case = paged_case([70, 9], q_lens=[70, 4], block_size=16, seed=3)
    args = (*case.tensors(), case.cu_q_lens, case.seq_lens)
    out = tb.paged_attention_prefill(*args, max_q_len=1)
    _check(out, case, decode=False, dtype=torch.float32)
    assert torch.equal(out, tb.paged_attention_prefill(*args))


def test_decode_is_bit_identical_whatever_the_batch():
    """Fixed split size: a sequence's output does not depend on the other rows of the batch, on
    the block table's width (the number of splits launched) or on where its blocks are."""
    case = paged_case([700, 5, 260, 33], hq=8, hkv=2, d=64, block_size=16, dtype=torch.float16, seed=4)
    full = tb.paged_attention_decode(*case.tensors(), case.seq_lens)
    for i in (0, 2):
        rows = slice(i, i + 1)
        alone = tb.paged_attention_decode(case.q[rows], case.k_pool, case.v_pool, case.block_tables[rows],
                                          case.seq_lens[rows])
        assert torch.equal(alone, full[rows])
    wider = torch.full((4, case.block_tables.shape[1] + 40), -1, dtype=torch.int32)
    wider[:, :case.block_tables.shape[1]] = case.block_tables
    assert torch.equal(tb.paged_attention_decode(case.q, case.k_pool, case.v_pool, wider, case.seq_lens), full)


def test_strided_query_and_int64_tables():
    """q as a view of a fused qkv projection, int64 lengths and tables."""
    case = paged_case([23, 50], q_lens=[23, 6], hq=4, hkv=2, d=64, block_size=16, seed=5)
    qkv = torch.randn(case.q.shape[0], 3, 4, 64)
    qkv[:, 0] = case.q
    q = qkv[:, 0]
    assert not q.is_contiguous()
    out = tb.paged_attention_prefill(q, case.k_pool, case.v_pool, case.block_tables.long(), case.cu_q_lens.long(),
                                     case.seq_lens.long())
    _check(out, case, decode=False, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_append_prefill_and_decode_slots(dtype):
    """Prefill (T tokens of several sequences, slots from paged_slot_mapping) and a decode step
    (one per sequence, padding rows -1) write exactly what the reference writes, nothing else."""
    torch.manual_seed(6)
    hkv, d, bs = 2, 80, 16
    pools = [torch.full((9, hkv, bs, d), float("nan"), dtype=dtype) for _ in range(4)]
    tables = torch.tensor([[4, 0, 7], [2, 8, 5]], dtype=torch.int32)
    lens, cu = torch.tensor([17, 33], dtype=torch.int32), torch.tensor([0, 17, 22], dtype=torch.int32)
    slots = ops.paged_slot_mapping(tables, cu, lens, bs, 25)  # 5 extend tokens of sequence 1, 3 pad rows
    step = torch.tensor([0 * bs + 1, -1, 5 * bs + 1], dtype=torch.int32)  # positions 17 and 33
    for s in (slots, step):
        k, v = torch.randn(s.shape[0], hkv, d).to(dtype), torch.randn(s.shape[0], hkv, d).to(dtype)
        ref.paged_kv_append(pools[0], pools[1], k, v, s)
        tb.paged_kv_append(pools[2], pools[3], k, v, s)
    assert torch.equal(pools[0].nan_to_num(7.0), pools[2].nan_to_num(7.0))
    assert torch.equal(pools[1].nan_to_num(7.0), pools[3].nan_to_num(7.0))
    assert pools[2].isnan().any()  # the rows no slot names are untouched


def test_gradients_go_to_the_reference_and_dispatch_picks_triton():
    case = paged_case([9, 4], block_size=8, seed=7)
    q = case.q.clone().requires_grad_()
    out = tb.paged_attention_decode(q, case.k_pool, case.v_pool, case.block_tables, case.seq_lens)
    out.sum().backward()
    assert q.grad is not None and not q.grad.isnan().any()
    for op in ("paged_attention_decode", "paged_attention_prefill", "paged_kv_append"):
        assert ops.resolve(op, torch.device("cpu"), "triton")[0] == "triton"
    with pytest.raises(ValueError, match="head_dim 320 > 256"):
        paged_kernels.check_supported(torch.empty(1, 2, 320), case.k_pool, "paged_attention_decode")
