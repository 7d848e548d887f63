"""CI for the cuda backend on a machine without a GPU: the extension compiles (nvcc,
TORCH_CUDA_ARCH_LIST=9.0 unless set) and loads, every op is registered with the declared
schema, the fake implementations give the right shapes and dtypes on meta tensors, and the
build/fallback logic reports clear reasons instead of crashing.

The tests that build skip, naming the reason, where the extension cannot be built at all
(no nvcc, a torch without CUDA, nvcc and torch on different CUDA majors, no ninja), so the
CPU-only suite passes without a CUDA toolkit; where nvcc is there they compile, and a
compile error fails them. The build goes to the normal cache (FASTRLHF_CACHE or
~/.cache/fastrlhf/ops), so only the first run after a source change compiles (a few
minutes on 2 cores); later runs reuse it.
"""
import os
import shutil

import pytest
import torch

from fastrlhf.ops import cuda_backend as cb
from fastrlhf.ops import cuda_build

META = torch.device("meta")
CI_ARCH = "9.0"  # torch 2.14.1 is a CUDA 13.0 build; nvcc 13.0 targets sm_90 without a GPU


def _skip_without_toolchain():
    problem = cuda_build.toolchain_problem()
    if problem:
        pytest.skip(f"the CUDA extension cannot be built on this machine: {problem}")


@pytest.fixture(scope="module")
def cuda_ops():
    _skip_without_toolchain()
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not saved and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = CI_ARCH  # only for this build, not other tests
    try:
        ok, why = cb.load_extension()
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    assert ok, f"CUDA extension failed to build/load: {why}"
    return torch.ops.fastrlhf_cuda


def test_every_op_is_registered_with_its_schema(cuda_ops):
    for name in cb.OP_NAMES:
        assert hasattr(cuda_ops, name), f"fastrlhf_cuda::{name} not registered"
    mutated = {name: [a.name for a in getattr(cuda_ops, name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write]
               for name in cb.OP_NAMES}
    assert mutated["rotary_"] == ["q", "k"]
    assert mutated["kv_cache_append_"] == ["k_cache", "v_cache"]
    assert mutated["lora_fuse_out"] == ["out"]
    assert mutated["paged_kv_append_"] == ["k_pool", "v_pool"]
    writers = ("rotary_", "kv_cache_append_", "lora_fuse_out", "paged_kv_append_")
    assert all(not v for k, v in mutated.items() if k not in writers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_implementations_on_meta_tensors(cuda_ops, dtype):
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=META)

    q, kc = t(3, 8, 64), t(3, 2, 100, 64)
    out = cuda_ops.attention_decode(q, kc, kc, t(3, dt=torch.long), None, 0.125)
    assert out.shape == (3, 8, 64) and out.dtype == dtype and out.device == META
    out = cuda_ops.attention_prefill(t(2, 8, 5, 128), t(2, 2, 9, 128), t(2, 2, 9, 128), True,
                                     t(2, 9, dt=torch.long), 0.1)
    assert out.shape == (2, 8, 5, 128) and out.dtype == dtype
    out = cuda_ops.lora_linear(t(2, 3, 40), t(24, 40), t(24), t(4, 40), t(24, 4), 2.0)
    assert out.shape == (2, 3, 24) and out.dtype == dtype
    out = cuda_ops.lora_fuse(t(24, 40), t(4, 40, dt=torch.float32), t(24, 4, dt=torch.float32), 2.0)
    assert out.shape == (24, 40) and out.dtype == dtype
    assert cuda_ops.lora_fuse_out(t(24, 40), t(4, 40), t(24, 4), 2.0, t(24, 40)) is None
    x = t(4, 7, 33)
    assert cuda_ops.rms_norm(x, t(33), 1e-6).shape == x.shape
    y, h = cuda_ops.rms_norm_residual(x, None, 1e-6, t(4, 7, 33))
    assert y.shape == h.shape == x.shape and y.dtype == h.dtype == dtype
    assert cuda_ops.layer_norm(x, t(33, dt=torch.float32), None, 1e-5).dtype == dtype
    y, h = cuda_ops.layer_norm_residual(x, None, None, 1e-5, t(4, 7, 33))
    assert y.shape == h.shape == x.shape
    assert cuda_ops.rotary_(t(2, 4, 5, 64), t(2, 1, 5, 64), t(50, 32, dt=torch.float32),
                            t(50, 32, dt=torch.float32), t(2, 5, dt=torch.long), -1) is None
    assert cuda_ops.kv_cache_append_(kc, kc, t(3, 2, 1, 64), t(3, 2, 1, 64), t(3, dt=torch.long)) is None
    pool, tables = t(40, 2, 16, 64), t(3, 7, dt=torch.int32)
    out = cuda_ops.paged_attention_decode(q, pool, pool, tables, t(3, dt=torch.int32), t(8, dt=torch.float32),
                                          0.125, 30.0, 64)
    assert out.shape == (3, 8, 64) and out.dtype == dtype and out.device == META
    assert cuda_ops.paged_kv_append_(pool, pool, t(5, 2, 64), t(5, 2, 64), t(5, dt=torch.int32)) is None


def test_status_report_names_arch_and_cache(cuda_ops):
    report = cuda_build.status_report()
    assert "cuda extension: loaded" in report
    # a finished build is marked, so the next process loads it without running ninja
    assert os.path.exists(os.path.join(cuda_build._state["path"], cuda_build.DONE_MARK))
    assert f"arch {cuda_build._state['archs']}" in report


def test_backend_unavailable_on_cpu_with_reason():
    ok, why = cb.available(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why


def test_arch_list_below_sm80_is_refused(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0")
    archs, why = cuda_build.target_archs()
    assert archs is None and "sm_80" in why
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    assert cuda_build.target_archs() == ("8.0 9.0+PTX", "")


def test_no_arch_without_gpu_is_a_reason_not_a_crash(monkeypatch):
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs, why = cuda_build.target_archs()
    assert archs is None and "TORCH_CUDA_ARCH_LIST" in why


def test_build_key_follows_sources_and_arch(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(cuda_build.source_dir(), src, ignore=shutil.ignore_patterns("__pycache__"))
    k1 = cuda_build.build_key("9.0", str(src))
    assert k1 == cuda_build.build_key("9.0", str(src))
    assert cuda_build.build_key("8.0", str(src)) != k1
    with open(src / "norms.cu", "a") as f:
        f.write("\n// edited\n")
    k2 = cuda_build.build_key("9.0", str(src))
    assert k2 != k1 and k2.split("-")[0] == k1.split("-")[0]  # same toolchain part: seedable


def test_missing_nvcc_is_reported(monkeypatch):
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: None)
    assert "nvcc not found" in cuda_build.toolchain_problem()


def test_build_tests_skip_with_the_reason_without_nvcc(monkeypatch):
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="cannot be built on this machine: nvcc not found"):
        _skip_without_toolchain()


def test_uncovered_calls_fall_back_on_cpu(monkeypatch):
    """Calls without a kernel (here fp32 prefill, gradients through lora_linear) are routed
    to another backend before any CUDA op is touched, so they also work on CPU tensors."""
    monkeypatch.setattr(cb, "_warned", set())  # the warning is once per process
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 32)
    with pytest.warns(RuntimeWarning, match="attention_prefill"):
        out = cb.attention_prefill(q, q, q, causal=True)
    from fastrlhf.ops import reference
    assert torch.allclose(out, reference.attention_prefill(q, q, q, causal=True), atol=1e-5)
    x = torch.randn(3, 16, requires_grad=True)
    w, a, b = torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    y = cb.lora_linear(x, w, None, a, b, 0.5)
    y.sum().backward()
    assert x.grad is not None and torch.allclose(y, reference.lora_linear(x, w, None, a, b, 0.5))


def test_new_source_version_is_seeded_from_previous_build(tmp_path, monkeypatch):
    """A new build directory starts as a copy (timestamps kept) of the newest one for the
    same toolchain/arch, so ninja recompiles only what changed; libraries and locks are
    not copied, and other toolchains are never used as a seed."""
    monkeypatch.setenv("FASTRLHF_CACHE", str(tmp_path))
    env = cuda_build.env_key("9.0")
    old = tmp_path / f"{env}-aaaa"
    old.mkdir()
    for name in (".ninja_log", "build.ninja", "norms.cuda.o", "fastrlhf_cuda.so", "lock", "BUILD_OK"):
        (old / name).write_text(name)
    os.utime(old / "norms.cuda.o", (1_000_000, 1_000_000))
    other = tmp_path / f"{cuda_build.env_key('8.0')}-cccc"
    other.mkdir()
    (other / ".ninja_log").write_text("x")
    (other / "rotary_kv.cuda.o").write_text("x")
    new = tmp_path / f"{env}-bbbb"
    cuda_build._seed_from_previous(str(new), "9.0")
    assert sorted(os.listdir(new)) == [".ninja_log", "build.ninja", "norms.cuda.o"]
    assert os.path.getmtime(new / "norms.cuda.o") == 1_000_000
    assert not [d for d in os.listdir(tmp_path) if ".tmp" in d]


def test_window_alibi_packed_calls_route_and_decode_windows_become_starts(monkeypatch):
    """The csrc kernels have no window/alibi/packed code: prefill calls with any of them (and decode
    calls with alibi) go to triton or the reference, warning once; a decode window is the csrc
    kernel's cache_starts raised to len - window (checked here with a stand-in for the kernel)."""
    from types import SimpleNamespace

    from fastrlhf.ops import reference
    monkeypatch.setattr(cb, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton unusable on CPU: the reference
    seen = []

    def fake_decode(q, kc, vc, lens, starts, scale):  # what the csrc kernel computes
        seen.append(starts)
        return reference.attention_decode(q, kc, vc, lens, cache_starts=starts, scale=scale)
    monkeypatch.setattr(cb, "_ops", lambda: SimpleNamespace(
        attention_decode=fake_decode, attention_prefill=lambda *a: pytest.fail("csrc prefill reached")))
    torch.manual_seed(1)
    q, kc, vc = torch.randn(3, 4, 32), torch.randn(3, 2, 20, 32), torch.randn(3, 2, 20, 32)
    lens, starts = torch.tensor([20, 9, 3]), torch.tensor([0, 6, 1])
    for st in (None, starts):
        out = cb.attention_decode(q, kc, vc, lens, cache_starts=st, window=5)
        assert torch.equal(seen[-1], torch.maximum(torch.tensor([15, 4, 0]), st if st is not None else lens * 0))
        assert torch.allclose(out, reference.attention_decode(q, kc, vc, lens, cache_starts=st, window=5), atol=1e-6)
    slopes = torch.rand(4)
    with pytest.warns(RuntimeWarning, match="attention_decode has no alibi_slopes kernel"):
        out = cb.attention_decode(q, kc, vc, lens, alibi_slopes=slopes, window=4)
    assert torch.equal(out, reference.attention_decode(q, kc, vc, lens, alibi_slopes=slopes, window=4))
    qp = torch.randn(1, 4, 10, 64, dtype=torch.float16)
    kp = torch.randn(1, 2, 10, 64, dtype=torch.float16)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    for kw, name in ((dict(window=3), "window"), (dict(alibi_slopes=slopes), "alibi_slopes"),
                     (dict(cu_seqlens=cu), "cu_seqlens")):
        with pytest.warns(RuntimeWarning, match=f"attention_prefill has no {name} kernel"):
            out = cb.attention_prefill(qp, kp, kp, **kw)
        assert torch.equal(out, reference.attention_prefill(qp, kp, kp, **kw))
