"""Every Triton kernel compiles for the GPU (sm_90, H100) in bf16/fp16, without a GPU.

The interpreter cannot check bf16 `tl.dot` nor anything the GPU compiler rejects (types of
loop-carried values, layouts, shared-memory use). Triton compiles to a cubin for a given
architecture on the CPU, so this test drives the real public functions with CPU tensors
inside `compile_only()`: each launch is compiled (every autotune config where asked) and
its shared-memory footprint checked against the H100 per-block limit. Outputs are not
computed here; numerics are the interpreter tests' and the GPU tests' job.
"""
import pytest
import torch

from fastrlhf.kernels._launch import compile_only
from fastrlhf.ops import triton_backend as tb

H100_SMEM_PER_BLOCK = 232448  # bytes of dynamic shared memory one block may use on sm_90


def _fits(records):
    """Per kernel launch, at least one compiled config fits the H100's shared memory."""
    by_kernel = {}
    for name, consts, shared in records:
        key = (name, tuple(sorted((k, v) for k, v in consts.items() if not k.startswith("BLOCK_")
                                  and k not in ("num_warps", "num_stages"))))
        by_kernel.setdefault(key, []).append(shared)
    return {k: min(v) <= H100_SMEM_PER_BLOCK for k, v in by_kernel.items()}


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 128),
                                            (torch.bfloat16, 256), (torch.float16, 128),
                                            (torch.float32, 64)])
def test_attention_kernels_compile_for_sm90(dtype, head_dim):
    all_configs = head_dim == 128 and dtype == torch.bfloat16  # the main production case
    q = torch.randn(2, 8, 33, head_dim, dtype=dtype)
    k = torch.randn(2, 2, 33, head_dim, dtype=dtype)
    with compile_only(90, all_configs=all_configs) as rec:
        tb.attention_prefill(q, k, k, causal=True, attention_mask=torch.ones(2, 33, dtype=torch.long))
        tb.attention_decode(q[:, :, 0], k, k, torch.tensor([3, 33]), cache_starts=torch.tensor([0, 2]))
        # the attention logit softcapping variants (Gemma2)
        tb.attention_prefill(q, k, k, causal=True, attention_mask=torch.ones(2, 33, dtype=torch.long),
                             softcap=50.0)
        tb.attention_decode(q[:, :, 0], k, k, torch.tensor([3, 33]), cache_starts=torch.tensor([0, 2]),
                            softcap=50.0)
    names = {r[0] for r in rec.compiled}
    assert names == {"_prefill_kernel", "_decode_partial_kernel", "_decode_reduce_kernel"}
    capped = {(r[0], r[1]["SOFTCAP"]) for r in rec.compiled if "SOFTCAP" in r[1]}
    assert capped == {(n, c) for n in ("_prefill_kernel", "_decode_partial_kernel") for c in (False, True)}
    if all_configs:
        assert sum(r[0] == "_prefill_kernel" for r in rec.compiled) > 1
    assert all(_fits(rec.compiled).values()), rec.compiled


def test_other_kernels_compile_for_sm90():
    dtype = torch.bfloat16
    q = torch.randn(2, 8, 5, 128, dtype=dtype)
    k = torch.randn(2, 2, 5, 128, dtype=dtype)
    w = torch.randn(256, 96, dtype=dtype)
    a = torch.randn(16, 96, dtype=dtype)
    b = torch.randn(256, 16, dtype=dtype)
    x = torch.randn(4, 4096, dtype=dtype)
    with compile_only(90) as rec:
        tb.kv_cache_append(k, k.clone(), k[:, :, :1], k[:, :, :1], torch.tensor([0, 3]))
        tb.lora_linear(torch.randn(3, 96, dtype=dtype), w, None, a, b, 2.0)
        tb.lora_fuse(w, a, b, 0.5, out=w)
        tb.rms_norm(x, torch.ones(4096, dtype=dtype), 1e-6, x.clone())
        tb.layer_norm(x, None, None, 1e-5)
        tb.rotary(q, k, torch.randn(9, 32), torch.randn(9, 32), torch.zeros(2, 5, dtype=torch.long),
                  rotary_dim=64)
    names = [r[0] for r in rec.compiled]
    for kernel in ("_append_kernel", "_expand_kernel", "_fuse_kernel", "_norm_kernel", "_rotary_kernel"):
        assert kernel in names
    assert all(_fits(rec.compiled).values()), rec.compiled


def test_gpu_compile_still_works_after_interpreted_launches(monkeypatch, tmp_path):
    """Interpreter runs (CPU tests) must leave triton.language unpatched, and our jitted
    helpers in place, for GPU compiles later in the same process (e.g. the GPU tests after
    the interpreter tests)."""
    from triton.runtime import JITFunction

    from fastrlhf.kernels import _attention_common, attention_decode
    from fastrlhf.kernels._launch import CompileUnavailable, compile_unavailable
    if compile_unavailable():  # nothing was jitted for the GPU in this process
        raise CompileUnavailable(compile_unavailable())

    x = torch.randn(3, 40)
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "1")
        tb.layer_norm(x, None, None, 1e-5)  # tl.sum in the interpreter
        tb.attention_decode(torch.randn(1, 2, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16),
                            torch.tensor([9]))  # tl.max, tl.cdiv, tl.zeros; shared attention helpers
    # the interpreted stand-ins swapped in for the launches are gone again
    assert isinstance(attention_decode.online_softmax_step, JITFunction)
    assert isinstance(_attention_common._finite_or_zero, JITFunction)
    # an empty Triton cache, so that the kernels are really compiled, not loaded from disk
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with compile_only(90) as rec:
        tb.layer_norm(x.bfloat16(), None, None, 1e-5)
        q = torch.randn(1, 2, 5, 16).bfloat16()
        tb.attention_prefill(q, q, q)
        tb.attention_decode(torch.randn(1, 2, 16).bfloat16(), torch.randn(1, 1, 9, 16).bfloat16(),
                            torch.randn(1, 1, 9, 16).bfloat16(), torch.tensor([9]))
    assert {r[0] for r in rec.compiled} == {"_norm_kernel", "_prefill_kernel", "_decode_partial_kernel",
                                          "_decode_reduce_kernel"}


def test_compile_checks_skip_naming_the_reason_when_triton_was_imported_interpreting(tmp_path):
    """TRITON_INTERPRET=1 for a whole run (as for CPU runs of the Triton tests): the compile checks
    cannot compile and say why as a skip; the interpreter tests of the same file still run."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          f"{here}/test_token_logprobs.py::test_triton_kernels_compile_for_sm90_bf16",
                          f"{here}/test_token_logprobs.py::test_dispatch_routes_token_logprobs"],
                         env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed, 1 skipped" in out.stdout, out.stdout[-3000:]
    assert "TRITON_INTERPRET=1 was set when triton was imported" in out.stdout, out.stdout[-3000:]
