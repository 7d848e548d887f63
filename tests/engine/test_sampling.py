"""Sampling: filters against hand-computed / HF results, seeded reproducibility, distributions."""

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from fastrlhf.hybrid_engine.sampling import (SamplingParams, apply_repetition_penalty, choose_tokens,
                                             process_logits, top_k_filter, top_p_filter)
from conftest import build_tiny, left_padded_batch


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("llama"))


def _freqs(logits, params, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = process_logits(logits.expand(n, -1).clone(), params, seen=None, n_generated=0, eos_ids=[])
    toks = choose_tokens(rows, params, g)
    return torch.bincount(toks, minlength=logits.shape[-1]).float() / n


def test_top_p_keeps_smallest_nucleus_and_renormalises():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    f = _freqs(p.log()[None], SamplingParams(top_p=0.7))
    # {0, 1} carry 0.8 >= 0.7 and {0} alone 0.5 < 0.7: renormalised to 0.625 / 0.375
    assert f[2] == 0 and f[3] == 0
    assert abs(f[0].item() - 0.625) < 0.02 and abs(f[1].item() - 0.375) < 0.02


def test_temperature_sharpens_and_flattens_as_p_to_the_one_over_t():
    p = torch.tensor([0.6, 0.3, 0.1])
    for temp in (0.5, 2.0):
        want = p ** (1 / temp)
        want = want / want.sum()
        f = _freqs(p.log()[None], SamplingParams(temperature=temp), seed=int(temp * 10))
        assert torch.allclose(f, want, atol=0.02), (temp, f, want)


def test_top_k_keeps_k_largest_with_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out).tolist() == [[True, False, True, False, True]]
    out3 = top_k_filter(logits, 3)
    assert torch.isfinite(out3).tolist() == [[False, True, True, True, False]]


def test_filters_match_hf_warpers_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(7, 53) * 3
    ids = torch.randint(0, 53, (7, 9))
    seen = torch.zeros(7, 53, dtype=torch.bool).scatter_(1, ids, True)
    ours = apply_repetition_penalty(logits, seen, 1.4)
    ref = RepetitionPenaltyLogitsProcessor(1.4)(ids, logits.clone())
    assert torch.allclose(ours, ref)
    for k in (1, 5, 52):
        assert torch.equal(torch.isinf(top_k_filter(logits, k)),
                           torch.isinf(TopKLogitsWarper(k)(ids, logits.clone())))
    for p in (0.05, 0.5, 0.9):
        assert torch.equal(torch.isinf(top_p_filter(logits, p)),
                           torch.isinf(TopPLogitsWarper(p)(ids, logits.clone())))
    assert torch.allclose(process_logits(logits, SamplingParams(temperature=0.7), seen=None,
                                         n_generated=0, eos_ids=[]),
                          TemperatureLogitsWarper(0.7)(ids, logits.clone()))


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5]]


def test_bad_sampling_options_fail_early_with_the_fix(llama):
    engine = HybridEngine(llama, None, EngineConfig(backend="torch"))
    ids, mask = left_padded_batch([3, 4])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(ids, mask, max_new_tokens=2, temperature=0.0, pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(ids, mask, max_new_tokens=2, top_p=1.5, pad_token_id=0)
    with pytest.raises(TypeError, match="generator"):
        engine.generate(ids, mask, max_new_tokens=2, generator="seed", pad_token_id=0)


def test_same_seed_same_samples_and_top_k_one_is_greedy(llama):
    engine = HybridEngine(llama, None, EngineConfig(backend="torch"))
    ids, mask = left_padded_batch([4, 9, 6], seed=7)
    kw = dict(max_new_tokens=24, min_new_tokens=24, pad_token_id=0, temperature=1.3, top_p=0.95)
    a = engine.generate(ids, mask, generator=123, **kw).sequences
    b = engine.generate(ids, mask, generator=torch.Generator().manual_seed(123), **kw).sequences
    c = engine.generate(ids, mask, generator=124, **kw).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = engine.generate(ids, mask, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                             pad_token_id=0).sequences
    top1 = engine.generate(ids, mask, do_sample=True, top_k=1, temperature=0.7, generator=5,
                           max_new_tokens=24, min_new_tokens=24, pad_token_id=0).sequences
    assert torch.equal(top1, greedy)


def test_repetition_penalty_and_min_new_tokens_match_hf_greedy(llama):
    ids, mask = left_padded_batch([8, 8, 8], seed=8)  # unpadded: HF penalises pad ids too
    probe = llama.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3,
                           min_new_tokens=3, pad_token_id=0, repetition_penalty=1.5)
    eos = int(probe[1, -3])  # a token greedy would emit first for row 1
    engine = HybridEngine(llama, None, EngineConfig(backend="torch"))
    kw = dict(do_sample=False, max_new_tokens=20, min_new_tokens=6, repetition_penalty=1.5,
              eos_token_id=eos, pad_token_id=0)
    ours = engine.generate(ids, mask, **kw).sequences
    ref = llama.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ours, ref)
    assert not (ours[:, 8:14] == eos).any(), "min_new_tokens must hold EOS back"


def test_logprobs_match_a_training_forward(llama):
    engine = HybridEngine(llama, None, EngineConfig(backend="torch"))
    ids, mask = left_padded_batch([5, 12, 2, 9], seed=9)
    out = engine.generate(ids, mask, max_new_tokens=32, min_new_tokens=32, generator=3,
                          pad_token_id=0, return_logprobs=True, temperature=0.9, top_k=20)
    seq = out.sequences
    full = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1)
    with torch.no_grad():
        logits = llama(input_ids=seq, attention_mask=full,
                       position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
    p = ids.shape[1]
    ref = torch.log_softmax(logits[:, p - 1:-1].float(), -1).gather(-1, seq[:, p:, None])[..., 0]
    diff = (ref - out.logprobs).abs().max().item()
    print(f"max |logprob(generation) - logprob(training forward)| = {diff:.2e} (fp32)")
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (4, 32)
    assert diff < 1e-4
