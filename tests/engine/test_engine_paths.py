"""The engine's other execution paths give the same tokens as HF generate.

- the pure-ops decode path (lean_cpu_decode=False: every step through fastrlhf.ops);
- the Triton kernels (TRITON_INTERPRET=1 on the CPU): the path GPUs take, minus CUDA graphs;
- on a GPU (marked, skipped without CUDA): CUDA graphs on/off, bf16 log-prob gap.
"""
import pytest
import torch

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from conftest import build_tiny, left_padded_batch, training_logprobs


def _greedy_pair(model, config, lengths=(5, 9, 3), new=10, device="cpu"):
    ids, mask = left_padded_batch(list(lengths), seed=31)
    ids, mask = ids.to(device), mask.to(device)
    engine = HybridEngine(model, None, config)
    ours = engine.generate(ids, mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
    return ours.sequences, ref


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "falcon", "opt", "qwen3", "opt_proj", "phi3",
                                  "gemma", "gemma2", "stablelm", "stablelm_parallel", "starcoder2",
                                  "bloom", "smollm3"])  # ALiBi; a layer without rotary
def test_pure_ops_decode_path_equals_hf(tmp_path, name):
    model = build_tiny(name, tmp_path)
    ours, ref = _greedy_pair(model, EngineConfig(backend="torch", lean_cpu_decode=False,
                                                 fuse_projections=False))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("lean", [True, False])
def test_torch_backend_decodes_through_the_lean_step_unless_disabled(tmp_path, monkeypatch, lean):
    """The greedy-vs-HF tests of every family (test_engine_arch.py) run the lean CPU step:
    check that the torch backend really takes it, and that lean_cpu_decode=False does not."""
    from fastrlhf.hybrid_engine import attention
    calls = []
    attend = attention.LeanPagedDecodeAttention.attend
    monkeypatch.setattr(attention.LeanPagedDecodeAttention, "attend",
                        lambda self, *a: calls.append(a[0]) or attend(self, *a))
    model = build_tiny("llama", tmp_path)  # 2 layers
    ours, ref = _greedy_pair(model, EngineConfig(backend="torch", lean_cpu_decode=lean), new=4)
    assert torch.equal(ours, ref)
    assert calls == ([0, 1] * 3 if lean else [])  # 3 decode steps after the prefill's token


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "falcon_new", "qwen3", "phi3", "gemma", "gemma2",
                                  "stablelm", "starcoder2"])
def test_triton_kernels_path_equals_hf(tmp_path, monkeypatch, name):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastrlhf import ops
    ok, why = ops.backend_status("triton", torch.device("cpu"))
    assert ok, why
    model = build_tiny(name, tmp_path)
    engine_cfg = EngineConfig(backend="triton")
    ours, ref = _greedy_pair(model, engine_cfg, new=6)
    assert torch.equal(ours, ref)


gpu = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py


@gpu
@pytest.mark.parametrize("name", ["llama", "opt", "gpt_neox",
                                  "gemma3_text", "bloom"])  # past sliding windows; ALiBi
def test_gpu_cuda_graphs_equal_eager_and_hf(tmp_path, name):
    model = build_tiny(name, tmp_path).cuda()
    graphs, ref = _greedy_pair(model, EngineConfig(cuda_graphs=True), new=24, device="cuda")
    eager, _ = _greedy_pair(model, EngineConfig(cuda_graphs=False), new=24, device="cuda")
    assert torch.equal(graphs, eager)
    assert torch.equal(graphs, ref)


@gpu
def test_gpu_bf16_logprobs_close_to_training_forward(tmp_path):
    model = build_tiny("llama", tmp_path, dtype=torch.bfloat16).cuda()
    ids, mask = left_padded_batch([5, 12, 7], seed=32)
    ids, mask = ids.cuda(), mask.cuda()
    out = HybridEngine(model, None, EngineConfig()).generate(
        ids, mask, max_new_tokens=24, min_new_tokens=24, generator=1, pad_token_id=0,
        return_logprobs=True)
    ref = training_logprobs(model, out.sequences, mask)
    diff = (ref - out.logprobs).abs().max().item()
    print(f"bf16 max |logprob(generation) - logprob(training forward)| = {diff:.3e}")
    assert diff < 0.1
