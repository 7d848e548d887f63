"""The hybrid engine generating with the triton backend (CPU interpreter) matches the torch
backend: the kernels under real use (strided q/k/v views of fused projections, partial
rotary, GQA, left padding, KV-cache appends at per-step columns, residual norms)."""
import pytest
import torch

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from conftest import build_tiny, left_padded_batch

NEW_TOKENS = 6


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "opt"])
def test_engine_generation_triton_equals_torch(family, tmp_path):
    model = build_tiny(family, tmp_path)
    ids, mask = left_padded_batch([5, 11, 3], pad_id=0, seed=7)
    outs = {}
    for backend in ("torch", "triton"):
        engine = HybridEngine(model, None, EngineConfig(backend=backend))
        outs[backend] = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                        min_new_tokens=NEW_TOKENS, pad_token_id=0, return_logprobs=True)
    assert torch.equal(outs["triton"].sequences, outs["torch"].sequences)
    lp_t, lp_r = outs["triton"].logprobs, outs["torch"].logprobs
    assert not torch.isnan(lp_t).any()
    assert (lp_t - lp_r).abs().max() < 1e-4
