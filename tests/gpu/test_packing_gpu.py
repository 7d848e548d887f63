"""Training without padding on a CUDA GPU: a ragged batch of long sequences packed into one row
gives the padded batch's log-probs (bf16 and fp32) and gradients (fp32), through the trainers'
per-sequence attention (HF sdpa stood in for) and through fastrlhf's injected attention (its
triton kernel takes the packed row); the probe the trainers run passes. Skipped without CUDA
(run by benchmarks/gpu_suite.sh, stage gpu_tests_other)."""
import pytest
import torch

from conftest import padded_and_packed_logprobs
from fastrlhf.rlhf.packing import check_packed_attention

pytestmark = pytest.mark.gpu  # skipped without CUDA by the rule in conftest.py


def _model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", dtype).train()


def _ragged(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = torch.randint(4, 1000, (n,), generator=g), 1
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("inject", [False, True], ids=["stand_in_sdpa", "injected"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_logprobs_and_gradients_equal_padded_on_cuda(dtype, inject):
    model = _model(dtype)
    if inject:
        from fastrlhf import inject as fastrlhf_inject
        fastrlhf_inject(model)
    (padded, packed), real = padded_and_packed_logprobs(model, *_ragged([400, 17, 250, 1, 90, 333, 64, 129]))
    tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(packed[0][real], padded[0][real], **tol)
    if dtype == torch.float32:
        for n, g in padded[1].items():
            torch.testing.assert_close(packed[1][n], g, atol=1e-4, rtol=1e-3, msg=n)
    check_packed_attention(model, "actor", torch.device("cuda"), "fp32" if dtype == torch.float32 else "bf16")
