"""ops.token_logprobs (the chunked torch reference and the Triton kernel under the interpreter)
against float64 autograd of the unfused path: logits, log_softmax, gather.

Odd shapes: rows, hidden size and vocabulary are not multiples of any block, and the
reference's blocks are shrunk so that rows and vocabulary are both cut into several chunks
(the online logsumexp crosses slice boundaries). Triton outputs and d hidden are NaN-poisoned
(`poison_outputs`), so an element a kernel never writes fails. bf16 is GPU-only
(tests/gpu/test_triton_gpu.py).
"""
import pytest
import torch

from fastrlhf import ops
from fastrlhf.kernels import token_logprobs as tlp_kernels
from fastrlhf.kernels._launch import compile_only, poison_outputs
from fastrlhf.ops import logprobs_reference as lref
from fastrlhf.ops import triton_backend as tb
from conftest import TOL, rel_err

N, H, V = 37, 72, 1531


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(dtype, seed, n=N, h=H, v=V, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.8).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore:
        targets[::7] = -100  # ignored rows (HF labels)
    g_logp = torch.randn(n, generator=g)
    g_ent = torch.randn(n, generator=g)
    return hidden, weight, targets, g_logp, g_ent


def _float64_truth(hidden, weight, targets, g_logp, g_ent, temperature, entropy):
    """Values and (d hidden, d weight) of the unfused path in float64."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    out = lref.unfused_token_logprobs(h, w, targets, temperature=temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp.double()).sum() + ((ent * g_ent.double()).sum() if entropy else 0)
    loss.backward()
    return logp.detach(), (ent.detach() if entropy else None), h.grad, w.grad


def _run(fn, hidden, weight, targets, g_logp, g_ent, temperature, entropy):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn(h, w, targets, temperature=temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (hidden.shape[0],)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if entropy else 0)
    loss.backward()
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    return logp.detach(), (ent.detach() if entropy else None), h.grad, w.grad


def _check(got, truth, tol, targets):
    names = ("logp", "entropy", "d hidden", "d weight")
    for name, a, b in zip(names, got, truth):
        if b is None:
            continue
        assert rel_err(a, b) < tol, name
    ignored = targets < 0
    assert torch.all(got[0][ignored] == 0) and torch.all(got[2][ignored] == 0)


@pytest.fixture
def small_reference_blocks(monkeypatch):
    # rows in chunks of 8 and the vocabulary in slices of 8*64 = 512: 5 x 3 blocks
    monkeypatch.setattr(lref, "ROW_CHUNK", 8)
    monkeypatch.setattr(lref, "BLOCK_ELEMENTS", 8 * 512)


@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_reference_matches_float64_unfused(small_reference_blocks, temperature, entropy):
    args = _inputs(torch.float32, seed=1)
    got = _run(lref.token_logprobs, *args, temperature, entropy)
    truth = _float64_truth(*args, temperature, entropy)
    _check(got, truth, TOL[torch.float32], args[2])


def test_reference_only_the_gradients_asked_for(small_reference_blocks):
    hidden, weight, targets, g_logp, _ = _inputs(torch.float32, seed=2, ignore=False)
    h = hidden.clone().requires_grad_()
    lref.token_logprobs(h, weight, targets).sum().backward()  # weight frozen (a reference model)
    truth = _float64_truth(hidden, weight, targets, torch.ones(N), None, 1.0, False)
    assert rel_err(h.grad, truth[2]) < TOL[torch.float32]
    with torch.no_grad():
        assert rel_err(lref.token_logprobs(hidden, weight, targets), truth[0]) < TOL[torch.float32]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with poison_outputs():
        yield


@pytest.mark.parametrize("dtype,temperature,entropy", [
    (torch.float32, 1.0, True), (torch.float32, 1.3, False), (torch.float16, 0.8, True)])
def test_triton_matches_float64_unfused(interpreter, monkeypatch, dtype, temperature, entropy):
    args = _inputs(dtype, seed=3)
    monkeypatch.setattr(tlp_kernels, "LOGITS_CHUNK_BYTES", 4 * V * 4)  # chunks of 4 rows
    assert tlp_kernels.row_chunk(N, V, H, args[0].element_size()) < N  # several row chunks
    assert tlp_kernels._block_v(V) < V          # several vocabulary slices per row
    got = _run(tb.token_logprobs, *args, temperature, entropy)
    truth = _float64_truth(*args, temperature, entropy)
    # fp16: the chunk's logits and dz are rounded to fp16 (as the unfused fp16 path rounds them)
    _check(got, truth, TOL[dtype] * (2 if dtype == torch.float16 else 1), args[2])


def test_dispatch_routes_token_logprobs(interpreter):
    hidden, weight, targets, *_ = _inputs(torch.float32, seed=4, n=5, v=300)
    a = ops.token_logprobs(hidden, weight, targets, backend="triton")
    b = ops.token_logprobs(hidden, weight, targets, backend="torch")
    assert rel_err(a, b) < TOL[torch.float32]
    assert ops.resolve("token_logprobs", hidden.device, "triton")[0] == "triton"


@pytest.mark.parametrize("fn", [lref.token_logprobs, tb.token_logprobs])
def test_bad_inputs_fail_early_and_clearly(fn):
    hidden, weight, targets, *_ = _inputs(torch.float32, seed=5, n=4, v=50)
    with pytest.raises(ValueError, match="hidden size"):
        fn(hidden[:, :-1], weight, targets)
    with pytest.raises(ValueError, match=r"targets must be \[N\]"):
        fn(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="vocabulary size 50"):
        fn(hidden, weight, torch.tensor([0, 1, 2, 50]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fn(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="flatten batch and sequence"):
        fn(hidden[None], weight, targets)


def test_row_chunks_fit_the_budget_and_are_not_tiny():
    budget = tlp_kernels.LOGITS_CHUNK_BYTES
    rows = tlp_kernels.row_chunk(8192, 151936, 896, 2)  # Qwen-sized, bf16
    assert rows * 151936 * 2 <= budget and rows >= 256 and rows & (rows - 1) == 0
    assert tlp_kernels.row_chunk(5, 151936, 896, 2) == 5          # a small batch: one chunk
    assert tlp_kernels.row_chunk(1 << 20, 1 << 22, 4096, 4) == 1024  # never fewer rows than N·H/V


def test_triton_kernels_compile_for_sm90_bf16():
    hidden, weight, targets, g_logp, g_ent = _inputs(torch.bfloat16, seed=6, n=9, v=5000, h=64)
    with compile_only(90) as rec:
        logp, ent, lse = tlp_kernels.token_logprobs_forward(hidden, weight, targets, 1.0, True)
        tlp_kernels.token_logprobs_backward(hidden, weight, targets, lse, ent, g_logp, g_ent, 1.0, True, True)
        tlp_kernels.token_logprobs_forward(hidden, weight, targets, 1.0, False)
    names = {(r[0], r[1]["WANT_ENTROPY"]) for r in rec.compiled}
    assert names == {("_stats_kernel", True), ("_grad_kernel", True), ("_stats_kernel", False)}
