"""MoE log-probs at published widths: one decoder layer of Mixtral-8x7B, Qwen1.5-MoE-A2.7B
(qwen2_moe), Qwen3-30B-A3B and OLMoE-1B-7B with their real hidden/head/expert widths, top-k and
routing rules (fewer experts, a small vocabulary: a CPU test), HF's initialisation. The engine's
generation log-probs (fp32) must be those of the training forward on the generated sequences,
as the dense families are checked (tests/engine/test_engine_paths.py)."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from conftest import left_padded_batch, training_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SMALL = dict(num_hidden_layers=1, vocab_size=512, max_position_embeddings=256)
PUBLISHED = {  # published widths; experts cut to 2-4x top-k
    "mixtral": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    num_local_experts=2, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6),
    "qwen2_moe": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, intermediate_size=5632, num_experts=8,
                      num_experts_per_tok=4, norm_topk_prob=False),
    "qwen3_moe": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      moe_intermediate_size=768, intermediate_size=6144, num_experts=16, num_experts_per_tok=8,
                      norm_topk_prob=True, rope_theta=1e6),
    "olmoe": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024,
                  num_experts=16, num_experts_per_tok=8, norm_topk_prob=False, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_generation_logprobs_equal_the_training_forward_at_published_widths(family):
    cfg = AutoConfig.for_model(family, **PUBLISHED[family], **SMALL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask = left_padded_batch([7, 4], vocab=512, pad_id=0, seed=2)
    new = 6
    out = HybridEngine(model, None, EngineConfig(backend="torch")).generate(
        ids, mask, max_new_tokens=new, generator=5, eos_token_id=[], pad_token_id=0, return_logprobs=True)
    ref = training_logprobs(model, out.sequences, mask)
    diff = (ref - out.logprobs).abs().max().item()
    assert diff < 1e-4, f"{family}: max |log-prob(generation) - log-prob(training forward)| = {diff:.2e}"
