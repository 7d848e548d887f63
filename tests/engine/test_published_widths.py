"""Generation log-probs equal HF's forward at the attention widths of published checkpoints.

The tiny configs of test_engine_arch.py share one width; shape-dependent mistakes (head_dim 256,
one KV head, 16-112 ALiBi slopes beyond a power of two, partial rotary of 80-dim heads) show only
at real widths. Each model here has its checkpoint's hidden size, heads, KV heads, head_dim and
attention options (from its config.json on the hub), with 2 layers (the local/global pattern's
first two kinds), a 512-token vocabulary, an untied lm_head, a narrow MLP where the config has
one (Bloom's and Falcon's are 4 x hidden in HF) and a sliding window of 8, so that short
sequences run past it.
Random weights (HF's initialisation, norms randomised), fp32, greedy generation; the engine's
log-probs of the generated tokens against HF's forward over the whole sequence.
"""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from conftest import left_padded_batch, training_logprobs

VOCAB, LAYERS, MLP, WINDOW, NEW = 512, 2, 256, 8, 12
# untied lm_heads: with 2 layers a tied head mostly repeats the last token (saturated log-probs)
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=False)
PUBLISHED = {
    # google/gemma-3-1b-it: MQA, head_dim 256, local base 10k / global base 1M
    "gemma-3-1b": ("gemma3_text", dict(
        hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        intermediate_size=MLP, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    # bigscience/bloom-560m: 16 heads
    "bloom-560m": ("bloom", dict(hidden_size=1024, n_head=16)),
    # tiiuae/falcon-rw-1b: ALiBi over 32 heads (slopes not powers of two)
    "falcon-rw-1b": ("falcon", dict(hidden_size=2048, num_attention_heads=32, alibi=True, multi_query=False,
                                    parallel_attn=False, bias=True, new_decoder_architecture=False)),
    # mistralai/Mistral-7B-v0.1's attention: 32 heads over 8 KV heads, a window on every layer
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=MLP, sliding_window=WINDOW)),
    # allenai/OLMo-2-0425-1B: q/k norms over all 16 heads
    "olmo-2-1b": ("olmo2", dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                                intermediate_size=MLP, rms_norm_eps=1e-6)),
    # HuggingFaceTB/SmolLM3-3B: GQA 16/4, every 4th layer without rotary (here the 2nd of 2)
    "smollm3-3b": ("smollm3", dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                                   intermediate_size=MLP, no_rope_layer_interval=2)),
    # microsoft/phi-2: 32 heads of 80, rotary on 32 of them, q/k/v and lm_head biases
    "phi-2": ("phi", dict(hidden_size=2560, num_attention_heads=32, intermediate_size=MLP,
                          partial_rotary_factor=0.4)),
    # EleutherAI/gpt-neo-125m: no score scaling, a global and a local layer
    "gpt-neo-125m": ("gpt_neo", dict(hidden_size=768, num_heads=12, intermediate_size=MLP,
                                     attention_types=[[["global", "local"], 1]], window_size=WINDOW)),
    # ibm-granite/granite-3.1-2b-base: its four multipliers, GQA 32/8
    "granite-3.1-2b": ("granite", dict(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, intermediate_size=MLP,
        embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
        logits_scaling=8.0)),
    # bigcode/starcoderbase-1b: multi-query, 16 heads of 128
    "starcoderbase-1b": ("gpt_bigcode", dict(n_embd=2048, n_head=16, n_inner=MLP, multi_query=True)),
}
# HF's Falcon rounds slope * position to bf16 (an fp32 model too); the engine's bias is fp32. With
# 32 heads the slopes are not powers of two, so the roundings differ: by up to 2^-9 of
# slope * position / sqrt(head_dim) in a score, at most ~1e-3 here (positions < 32)
TOL = {"falcon-rw-1b": 5e-3}


def _model(family, kw):
    layers = "n_layer" if family in ("bloom", "gpt_bigcode") else "num_layers" if family == "gpt_neo" \
        else "num_hidden_layers"
    cfg = AutoConfig.for_model(family, **COMMON, **{layers: LAYERS}, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones (Gemma's to zeros): random ones catch mix-ups
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_generation_logprobs_equal_hf_at_published_widths(name):
    family, kw = PUBLISHED[name]
    model = _model(family, kw)
    ids, mask = left_padded_batch([13, 6], vocab=VOCAB, pad_id=0, seed=31)
    out = HybridEngine(model, None, EngineConfig(backend="torch")).generate(
        ids, mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, return_logprobs=True)
    ref = training_logprobs(model, out.sequences, mask)
    gap = (out.logprobs - ref).abs().max().item()
    print(f"{name}: max |log-prob(engine) - log-prob(HF forward)| = {gap:.2e} (log-probs down to "
          f"{ref.min().item():.2f})")
    assert ref.min() < -0.1, "saturated distributions: the comparison would be vacuous"
    assert gap < TOL.get(name, 1e-4)
