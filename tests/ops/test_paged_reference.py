"""The torch reference of the paged KV-cache ops (fastrlhf.ops.paged_reference), which defines
their semantics: against a literal float64 evaluation of the contract (tests/paged_cases.py),
against the dense ops on the same keys, and its errors for bad input."""
import pytest
import torch

from fastrlhf import ops
from fastrlhf.ops import reference as ref
from paged_cases import alibi, naive_attention, paged_case

BS = 4  # a small block size: many block boundaries in short sequences


def _f64(case):
    return case.q.double(), case.k_pool.double(), case.v_pool.double(), case.block_tables


OPTIONS = [dict(), dict(softcap=1.5), dict(window=5), dict(alibi_slopes=alibi(4)),
           dict(softcap=2.0, window=3, alibi_slopes=alibi(4), scale=0.3)]


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "softcap", "window", "alibi", "all"])
def test_decode_matches_the_contract(opts):
    # block boundaries (k*bs, k*bs +- 1), one token, one block, an empty row; GQA 4/2
    case = paged_case([1, BS, BS + 1, 3 * BS - 1, 3 * BS, 0, 11], block_size=BS, amp=2.0, seed=1)
    q, kp, vp, bt = _f64(case)
    out = ref.paged_attention_decode(q, kp, vp, bt, case.seq_lens, **opts)
    assert out.dtype == torch.float64 and not out.isnan().any()
    assert torch.allclose(out, naive_attention(case, decode=True, **opts), atol=1e-12)
    assert torch.all(out[5] == 0)  # seq_len 0: no key, zeros


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "softcap", "window", "alibi", "all"])
def test_prefill_and_extend_match_the_contract(opts):
    # full prefills (m = n), extends (m < n), one-token extends, an empty sequence; MQA 4/1
    lens, q_lens = [9, 8, 13, 1, 0, 5], [9, 3, 1, 1, 0, 4]
    case = paged_case(lens, q_lens=q_lens, hkv=1, block_size=BS, amp=2.0, seed=2, q_rows=sum(q_lens) + 2)
    q, kp, vp, bt = _f64(case)
    out = ref.paged_attention_prefill(q, kp, vp, bt, case.cu_q_lens, case.seq_lens, **opts)
    assert not out.isnan().any()
    assert torch.allclose(out, naive_attention(case, decode=False, **opts), atol=1e-12)
    assert torch.all(out[sum(q_lens):] == 0)  # rows past cu_q_lens[B]: zeros


def test_decode_equals_the_dense_decode_and_one_query_prefill():
    case = paged_case([7, 16, 33], hq=6, hkv=3, block_size=8, seed=3)
    q, kp, vp, bt = _f64(case)
    paged = ref.paged_attention_decode(q, kp, vp, bt, case.seq_lens)
    smax = 33
    kc = torch.zeros(3, 3, smax, 32, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    for b, (k, v) in enumerate(zip(case.k_seqs, case.v_seqs)):
        kc[b, :, :k.shape[1]], vc[b, :, :v.shape[1]] = k, v
    assert torch.allclose(paged, ref.attention_decode(q, kc, vc, case.seq_lens), atol=1e-12)
    as_prefill = ref.paged_attention_prefill(q, kp, vp, bt, torch.arange(4, dtype=torch.int32), case.seq_lens)
    assert torch.allclose(paged, as_prefill, atol=1e-12)


def test_append_through_slot_mapping_then_attend():
    """paged_kv_append fills the pool for a prefill (T tokens of many sequences, through
    paged_slot_mapping) and a decode step (one per sequence, a padding row skipped); attention
    over the pool then equals attention over the keys written."""
    torch.manual_seed(4)
    hkv, d, bs = 2, 16, 4
    k_pool = torch.full((12, hkv, bs, d), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    tables = torch.tensor([[5, 2, 9], [0, 11, 7]], dtype=torch.int32)
    lens = torch.tensor([6, 9], dtype=torch.int32)
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    k, v = torch.randn(16, hkv, d), torch.randn(16, hkv, d)  # one padding row at the end
    slots = ops.paged_slot_mapping(tables, cu, lens, bs, 16)
    assert slots.tolist() == [20, 21, 22, 23, 8, 9] + [0, 1, 2, 3, 44, 45, 46, 47, 28] + [-1]
    before = k_pool.clone()
    ops.paged_kv_append(k_pool, v_pool, k, v, slots)
    live = slots[:15]
    assert torch.equal(k_pool[live // bs, :, live % bs], k[:15])
    assert torch.equal(v_pool[live // bs, :, live % bs], v[:15])
    written = torch.zeros(12, bs, dtype=torch.bool)
    written.view(-1)[live] = True
    assert k_pool.transpose(1, 2)[~written].isnan().all() and before.isnan().all()
    # decode step: both sequences get one more token; a third, padding row is skipped
    lens2 = lens + 1
    step_slots = torch.tensor([int(tables[0, 6 // bs]) * bs + 6 % bs, int(tables[1, 9 // bs]) * bs + 9 % bs, -1])
    assert step_slots.tolist() == ops.paged_slot_mapping(tables, torch.arange(3, dtype=torch.int32), lens2,
                                                         bs, 3)[:2].tolist() + [-1]
    kn, vn = torch.randn(3, hkv, d), torch.randn(3, hkv, d)
    ops.paged_kv_append(k_pool, v_pool, kn, vn, step_slots)
    q = torch.randn(2, 4, d)
    dense_k = [torch.cat([k[:6], kn[:1]]), torch.cat([k[6:15], kn[1:2]])]
    dense_v = [torch.cat([v[:6], vn[:1]]), torch.cat([v[6:15], vn[1:2]])]
    out = ops.paged_attention_decode(q, k_pool, v_pool, tables, lens2, backend="torch")
    for b in range(2):
        expected = ref.attention_prefill(q[b][None, :, None], dense_k[b].transpose(0, 1)[None],
                                         dense_v[b].transpose(0, 1)[None], causal=False)[0, :, 0]
        assert torch.allclose(out[b], expected, atol=1e-5)


@pytest.mark.parametrize("decode", [False, True])
def test_reference_is_differentiable_in_q_and_pools(decode):
    """Gradients flow to q and the pools and stay finite although unused pool rows hold NaN."""
    case = paged_case([5, 9], q_lens=None if decode else [5, 2], block_size=BS, seed=5)
    q = case.q.clone().requires_grad_()
    kp, vp = case.k_pool.clone().requires_grad_(), case.v_pool.clone().requires_grad_()
    if decode:
        out = ref.paged_attention_decode(q, kp, vp, case.block_tables, case.seq_lens, window=3)
    else:
        out = ref.paged_attention_prefill(q, kp, vp, case.block_tables, case.cu_q_lens, case.seq_lens, window=3)
    out.sum().backward()
    for t in (q, kp, vp):
        assert t.grad.abs().sum() > 0 and not t.grad.isnan().any()


def test_bad_inputs_are_clear_errors():
    case = paged_case([5, 9], q_lens=[5, 2], block_size=BS, seed=6)
    q, kp, vp, bt = case.tensors()
    lens, cu = case.seq_lens, case.cu_q_lens
    dec = ops.paged_attention_decode
    with pytest.raises(ValueError, match="multiple of the pools' KV heads"):
        dec(torch.randn(2, 3, 32), kp, vp, bt, lens, backend="torch")
    with pytest.raises(TypeError, match="seq_lens must be an integer tensor"):
        dec(q[:2], kp, vp, bt, lens.float(), backend="torch")
    with pytest.raises(ValueError, match="seq_lens must be in"):
        dec(q[:2], kp, vp, bt, torch.tensor([5, 99], dtype=torch.int32), backend="torch")
    bad_table = bt.clone()
    bad_table[1, 1] = 1000
    with pytest.raises(ValueError, match="outside the pool"):
        dec(q[:2], kp, vp, bad_table, lens, backend="torch")
    with pytest.raises(ValueError, match="window must be a positive int"):
        dec(q[:2], kp, vp, bt, lens, window=0, backend="torch")
    with pytest.raises(ValueError, match="alibi_slopes"):
        dec(q[:2], kp, vp, bt, lens, alibi_slopes=torch.ones(3), backend="torch")
    with pytest.raises(ValueError, match="softcap"):
        dec(q[:2], kp, vp, bt, lens, softcap=-1.0, backend="torch")
    pre = ops.paged_attention_prefill
    with pytest.raises(ValueError, match="more queries than tokens"):
        pre(q, kp, vp, bt, torch.tensor([0, 6, 7], dtype=torch.int32), lens, backend="torch")
    with pytest.raises(ValueError, match="cu_q_lens must start at 0"):
        pre(q, kp, vp, bt, torch.tensor([0, 5, 99], dtype=torch.int32), lens, backend="torch")
    with pytest.raises(ValueError, match="max_q_len"):
        pre(q, kp, vp, bt, cu, lens, max_q_len=0, backend="torch")
    with pytest.raises(ValueError, match=r"k and v must be \[T, Hkv=2, D=32\]"):
        ops.paged_kv_append(kp, vp, torch.randn(3, 4, 32), torch.randn(3, 4, 32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="outside the pool"):
        ops.paged_kv_append(kp, vp, torch.randn(1, 2, 32), torch.randn(1, 2, 32),
                            torch.tensor([kp.shape[0] * BS], dtype=torch.int32))


def test_cuda_backend_hands_what_its_kernels_cannot_take_to_another_backend(monkeypatch):
    """Before any CUDA op is touched (so also on CPU tensors): head dims its vector loads cannot
    address, and calls that need gradients, run elsewhere (here the reference)."""
    from fastrlhf.ops import cuda_backend as cb

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(cb, "_warned", set())
    case = paged_case([9, 20], hq=4, hkv=2, d=20, block_size=BS, dtype=torch.float16, seed=7)
    with pytest.warns(RuntimeWarning, match="head dim 20"):
        out = cb.paged_attention_decode(*case.tensors(), case.seq_lens)
    assert torch.equal(out, ref.paged_attention_decode(*case.tensors(), case.seq_lens))
    q = case.q.float().requires_grad_()
    pools = case.k_pool.float(), case.v_pool.float()
    cb.paged_attention_decode(q, *pools, case.block_tables, case.seq_lens).sum().backward()
    assert q.grad is not None and not q.grad.isnan().any()
