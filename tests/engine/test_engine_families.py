"""The spec side of the windowed, local/global and ALiBi families: what each spec reads from its
config, ALiBi slopes equal to HF's, and the clear refusals. (Greedy identity with HF, prefill
logits and decode log-probs of every family run in test_engine_arch.py over conftest's tiny
configs.)"""
import math

import pytest
import torch
from transformers import AutoConfig

from fastrlhf.hybrid_engine import UnsupportedArchitecture
from fastrlhf.hybrid_engine.arch_spec import bloom_alibi_slopes, mpt_alibi_slopes, spec_for
from conftest import tiny_config

HEADS = [1, 4, 6, 8, 12, 16, 20, 32, 40, 71, 112]  # powers of two and not (Bloom-176B has 112)


@pytest.mark.parametrize("n", HEADS)
def test_alibi_slopes_are_hfs(n):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    assert torch.equal(torch.tensor(bloom_alibi_slopes(n), dtype=torch.float32), _get_alibi_slopes(n, "cpu"))
    # MPT's bias for the key one position back is -slope
    mpt = -build_mpt_alibi_tensor(n, 2)[:, 0, 0]
    assert torch.equal(torch.tensor(mpt_alibi_slopes(n), dtype=torch.float32), mpt)


def test_falcon_alibi_slopes_are_hfs_bf16_slopes_over_sqrt_head_dim():
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor
    spec = spec_for(AutoConfig.for_model("falcon", hidden_size=96, num_attention_heads=12, alibi=True,
                                         multi_query=False))
    assert spec.rotary_dim == 0 and spec.head_dim == 8
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), 12, torch.float32)[:, 0, 1]  # position 1
    assert torch.allclose(torch.tensor(spec.alibi_slopes), hf / math.sqrt(8), rtol=1e-6, atol=0)
    assert spec_for(AutoConfig.for_model("falcon")).alibi_slopes is None


def test_specs_read_windows_rotary_tables_and_alibi():
    gemma3 = spec_for(tiny_config("gemma3_text"))
    assert gemma3.layer_windows == (5, None, 5) and gemma3.q_norm == "self_attn.q_norm"
    assert gemma3.layer_rotary == ("sliding_attention", "full_attention", "sliding_attention")
    assert gemma3.attn_scale == 24 ** -0.5 and gemma3.final_logit_softcap == 6.0
    assert spec_for(tiny_config("olmo3")).layer_rotary == ("sliding_attention", "full_attention")
    assert spec_for(tiny_config("smollm3")).layer_rotary == ("", None)  # the second layer has no rotary
    assert spec_for(tiny_config("smollm3")).layer_windows == (None, 6)  # windows only on NoPE layers
    assert spec_for(tiny_config("ministral")).layer_windows == (None, 6)
    assert spec_for(tiny_config("gpt_neo")).layer_windows == (None, 5)
    assert spec_for(tiny_config("mistral")).layer_windows == (7, 7)
    bloom = spec_for(tiny_config("bloom"))
    assert bloom.embed_norm == "word_embeddings_layernorm" and bloom.qkv_layout == "grouped"
    assert len(bloom.alibi_slopes) == 6 and bloom.rotary_dim == 0
    mpt = spec_for(tiny_config("mpt"))
    assert mpt.clip_qkv == 0.6 and mpt.qkv_layout == "split" and mpt.max_positions == 128
    olmo2 = spec_for(tiny_config("olmo2"))
    assert olmo2.input_norm is None and not olmo2.qk_norm_per_head
    granite = spec_for(tiny_config("granite"))
    assert (granite.embed_scale, granite.attn_scale, granite.residual_multiplier,
            granite.logit_divisor) == (3.0, 0.3, 0.6, 1.7)


def test_families_the_spec_cannot_run_are_refused_with_the_fallback():
    bloom = tiny_config("bloom")
    bloom.apply_residual_connection_post_layernorm = True
    with pytest.raises(UnsupportedArchitecture, match="apply_residual_connection_post_layernorm.*fallback"):
        spec_for(bloom)
    gemma3 = tiny_config("gemma3_text")
    gemma3.use_bidirectional_attention = True
    with pytest.raises(UnsupportedArchitecture, match="bidirectional"):
        spec_for(gemma3)
    chunked = tiny_config("ministral")
    chunked.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedArchitecture, match="chunked_attention.*fallback='hf'"):
        spec_for(chunked)


def test_tensor_parallel_ranks_take_their_heads_alibi_slopes_and_refuse_all_head_norms():
    from fastrlhf.hybrid_engine.tensor_parallel import ShardPlan, check_tp_size
    spec = spec_for(tiny_config("bloom"))  # 6 heads
    plan = ShardPlan(spec, 2)
    assert plan.heads.local_spec(spec, 0).alibi_slopes == spec.alibi_slopes[:3]
    assert plan.heads.local_spec(spec, 1).alibi_slopes == spec.alibi_slopes[3:]
    check_tp_size(tiny_config("bloom"), 2, 2)
    for name in ("olmo2", "olmo3"):
        with pytest.raises(ValueError, match=r"q/k norms span all attention heads.*model: \[1\]"):
            check_tp_size(tiny_config(name), 2, 2)
