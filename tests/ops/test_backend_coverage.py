"""Every op of fastrlhf.ops.OPS is implemented by every backend, with the reference's
signature, or listed in that backend's FALLBACK_OPS; dispatch honours the list."""
import inspect

import pytest
import torch

from fastrlhf import ops
from fastrlhf.ops import cuda_backend, dispatch, reference, triton_backend

GPU_BACKENDS = {"triton": triton_backend, "cuda": cuda_backend}


def _parameters(fn):
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def test_reference_and_public_api_have_every_op():
    for op in ops.OPS:
        assert callable(getattr(reference, op, None)), f"the torch reference has no {op}"
        assert callable(getattr(ops, op, None)), f"fastrlhf.ops has no {op}"


@pytest.mark.parametrize("name", sorted(GPU_BACKENDS))
def test_every_op_is_implemented_or_listed_as_falling_back(name):
    backend = GPU_BACKENDS[name]
    listed = set(backend.FALLBACK_OPS)
    assert listed <= set(ops.OPS), f"{name}.FALLBACK_OPS names unknown ops {sorted(listed - set(ops.OPS))}"
    for op in ops.OPS:
        fn = getattr(backend, op, None)
        if op in listed:
            assert fn is None, f"the {name} backend lists {op} in FALLBACK_OPS but defines it"
            continue
        assert callable(fn), f"the {name} backend neither implements {op} nor lists it in FALLBACK_OPS"
        assert _parameters(fn) == _parameters(getattr(reference, op)), \
            f"{name}.{op} does not have the reference's signature"


def test_dispatch_skips_an_op_a_backend_lists_as_falling_back(monkeypatch):
    """With the triton backend available (the interpreter), an op it lists goes to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_warned", set())
    x, cpu = torch.randn(3, 8), torch.device("cpu")
    assert dispatch.resolve("rms_norm", cpu, "triton")[0] == "triton"
    monkeypatch.setattr(triton_backend, "FALLBACK_OPS", ("rms_norm",))
    monkeypatch.delattr(triton_backend, "rms_norm")
    with pytest.warns(RuntimeWarning, match="does not implement rms_norm"):
        name, fn = dispatch.resolve("rms_norm", cpu, "triton")
    assert name == "torch" and fn is reference.rms_norm
    assert torch.equal(ops.rms_norm(x, None, backend="triton"), reference.rms_norm(x, None))
