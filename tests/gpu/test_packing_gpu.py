"""Training without padding on a CUDA GPU: a ragged batch of long sequences packed into one row
gives the padded batch's log-probs (bf16 and fp32) and gradients (fp32), through the trainers'
per-sequence attention (HF sdpa stood in for) and through fastrlhf's injected attention (its
triton kernel takes the packed row), and with each group's prompt held once (--share_prompts); the
probe the trainers run passes. Skipped without CUDA
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompts_give_the_padded_logprobs_and_gradients_on_cuda(dtype):
    """--share_prompts on CUDA: groups of 4, 1 and 3 answers to prompts of 300, 41 and 120 tokens,
    each prompt held once in the packed row: the padded batch's answer log-probs (and fp32 gradients)."""
    from fastrlhf.rlhf.logprobs import shifted_logprobs
    from fastrlhf.utils.positions import position_ids_from_mask
    model = _model(dtype)
    g = torch.Generator().manual_seed(3)
    width, answers = 300, [200, 1, 77, 150, 9, 120, 33, 64]
    ids = torch.zeros(len(answers), width + max(answers), dtype=torch.long)
    mask = torch.zeros_like(ids)
    row = 0
    for p, size in ((300, 4), (41, 1), (120, 3)):
        prompt = torch.randint(4, 1000, (p,), generator=g)
        for _ in range(size):
            n = answers[row]
            ids[row, width - p:width], ids[row, width:width + n] = prompt, torch.randint(4, 1000, (n,), generator=g)
            mask[row, width - p:width + n] = 1
            row += 1
    ids, mask = ids.cuda(), mask.cuda()
    real = (mask[:, width:] * mask[:, width - 1:-1]).bool()
    outs = []
    for kw in ({}, dict(packed=True, shared_prefix=width)):
        model.zero_grad()
        logp = shifted_logprobs(model, ids, mask, position_ids=position_ids_from_mask(mask), start=width - 1, **kw)
        (logp * real).sum().backward()
        outs.append((logp.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (padded, shared) = outs
    tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(shared[0][real], padded[0][real], **tol)
    if dtype == torch.float32:
        for n, g in padded[1].items():
            torch.testing.assert_close(shared[1][n], g, atol=1e-4, rtol=1e-3, msg=n)
    check_packed_attention(model, "actor", torch.device("cuda"), "fp32" if dtype == torch.float32 else "bf16",
                           share=True)
