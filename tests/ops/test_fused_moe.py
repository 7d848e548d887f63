"""ops.fused_moe: the reference against a per-token float64 loop, the Triton kernel (interpreter,
fp32/fp16) against the float64 reference on odd shapes with poisoned outputs, the sm_90 compile
check (bf16), the gradient path, and the clear errors."""
import pytest
import torch

from fastrlhf import ops
from fastrlhf.kernels._launch import compile_only, poison_outputs
from fastrlhf.ops import reference as ref
from fastrlhf.ops import triton_backend as tb
from conftest import TOL

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(t, h, i, e, k, dtype, seed=0, experts_used=None):
    """Random hidden states, experts and routing; `experts_used` limits the chosen experts to the
    first n (the others get zero tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    down = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    n = experts_used or e
    logits = torch.randn(t, n, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(k, -1)
    return x, ids, weights, gate_up, down


def _per_token(x, ids, weights, gate_up, down):
    """The definition, one token and one slot at a time, in float64."""
    half = gate_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = gate_up[e].double() @ x[t].double()
            act = torch.nn.functional.silu(gu[:half]) * gu[half:]
            out[t] += float(weights[t, j]) * (down[e].double() @ act)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_is_the_per_token_definition():
    args = _inputs(9, 20, 12, 5, 2, torch.float64, seed=1)
    assert _rel(ref.fused_moe(*args), _per_token(*args)) < 1e-12
    # the public op on the CPU is the reference
    assert torch.equal(ops.fused_moe(*args), ref.fused_moe(*args))


# (tokens, hidden, intermediate, experts, top_k, dtype, experts that receive tokens)
CASES = [
    (13, 40, 24, 8, 2, torch.float32, None),     # T and widths not multiples of the blocks
    (5, 33, 17, 64, 8, torch.float16, None),     # many experts, top-8, most experts without tokens
    (37, 48, 20, 6, 1, torch.float32, 3),        # top-1; experts 3..5 get zero tokens
    (1, 24, 16, 4, 2, torch.float16, None),      # one token (decode of one sequence)
]


@pytest.mark.parametrize("t,h,i,e,k,dtype,used", CASES)
def test_triton_kernel_matches_float64_reference(monkeypatch, t, h, i, e, k, dtype, used):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ids, w, gu, dn = _inputs(t, h, i, e, k, dtype, seed=t, experts_used=used)
    with poison_outputs():
        out = tb.fused_moe(x, ids, w, gu, dn)
    assert out.dtype == dtype and out.shape == (t, h)
    assert torch.isfinite(out).all(), "some output (or intermediate) element was never written"
    exp = ref.fused_moe(x.double(), ids, w.double(), gu.double(), dn.double())
    # fp16: the activation is rounded once between the two matmuls, as the reference defines
    assert _rel(out, exp) < 4 * TOL[dtype]
    same_dtype = ref.fused_moe(x, ids, w, gu, dn)
    assert _rel(out, exp) <= 2 * _rel(same_dtype, exp) + TOL[dtype] / 4


def test_alignment_puts_each_block_on_one_expert_and_every_slot_once():
    from fastrlhf.kernels.fused_moe import align_slots
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 3]])
    slots, block_expert = align_slots(ids, n_experts=6, block_m=4)
    flat = ids.reshape(-1)
    real = slots[slots < flat.numel()].long()
    assert sorted(real.tolist()) == list(range(flat.numel()))
    for b, e in enumerate(block_expert.tolist()):
        rows = slots[b * 4:(b + 1) * 4].long()
        rows = rows[rows < flat.numel()]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == e).all()
    assert set(block_expert.tolist()) - {-1} == {0, 1, 2, 3}  # experts 4, 5: no tokens, no blocks


def test_calls_that_need_gradients_run_on_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ids, w, gu, dn = _inputs(6, 16, 16, 4, 2, torch.float32, seed=3)
    grads = []
    for fn in (tb.fused_moe, ref.fused_moe):
        xx, ww = x.clone().requires_grad_(), gu.clone().requires_grad_()
        fn(xx, ids, w, ww, dn).square().sum().backward()
        grads.append((xx.grad, ww.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


def test_bad_arguments_are_clear_errors():
    x, ids, w, gu, dn = _inputs(4, 16, 8, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="do not fit hidden width 16"):
        ref.fused_moe(x, ids, w, gu[:, :, :8], dn)
    with pytest.raises(ValueError, match=r"must both be \[T=4, k\]"):
        ref.fused_moe(x, ids[:3], w, gu, dn)
    with pytest.raises(ValueError, match="share a dtype"):
        ref.fused_moe(x, ids, w, gu.half(), dn.half())
    with pytest.raises(ValueError, match="activation 'gelu' is not supported"):
        ops.fused_moe(x, ids, w, gu, dn, activation="gelu")


def test_kernels_compile_for_sm90_in_bf16():
    x, ids, w, gu, dn = _inputs(64, 256, 96, 16, 4, torch.bfloat16)
    with compile_only(90, all_configs=False) as rec:
        tb.fused_moe(x, ids, w, gu, dn)
    names = {r[0] for r in rec.compiled}
    assert names == {"_gate_up_kernel", "_down_kernel"}
    assert all(r[2] <= 232448 for r in rec.compiled), rec.compiled  # H100 shared memory per block
