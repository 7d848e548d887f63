"""Mixture-of-experts specifics of the engine (the per-family HF identity tests run over conftest's
TINY_CONFIGS in test_engine_arch.py and test_inject_generate.py): the specs read each family's
routing rules, PEFT LoRA on the fused expert parameters is fused like linear LoRA, the triton
backend's fused MoE kernel runs inside generation, and the clear errors for routers and
tensor-parallel sizes the engine cannot serve."""
import dataclasses

import pytest
import torch
from transformers import AutoConfig

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine, UnsupportedArchitecture
from fastrlhf.hybrid_engine.arch_spec import check_moe, spec_for
from fastrlhf.hybrid_engine.tensor_parallel import check_tp_size, valid_tp_sizes
from conftest import build_tiny, left_padded_batch, peft_lora_on_experts, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)


def test_specs_read_each_family_routing():
    mix = spec_for(tiny_config("mixtral")).moe
    assert (mix.n_experts, mix.top_k, mix.norm_topk_prob, mix.weights_in_model_dtype) == (5, 2, True, False)
    q2 = spec_for(tiny_config("qwen2_moe"))
    assert q2.moe.shared_expert == "mlp.shared_expert" and q2.moe.shared_intermediate == 40
    assert q2.moe.shared_expert_gate and not q2.moe.norm_topk_prob and q2.moe.intermediate == 24
    assert q2.gate == "mlp.gate_proj"  # the dense layer (mlp_only_layers=[1]) runs the dense MLP
    q3 = spec_for(tiny_config("qwen3_moe"))
    assert q3.q_norm and q3.qk_norm_per_head and q3.moe.norm_topk_prob and q3.moe.shared_expert is None
    ol = spec_for(tiny_config("olmoe"))
    assert not ol.qk_norm_per_head and ol.clip_qkv == 1.0 and ol.moe.top_k == 2


def test_peft_lora_on_experts_is_fused_and_the_base_is_untouched(tmp_path):
    model = build_tiny("qwen2_moe", tmp_path)
    ids, mask = left_padded_batch([5, 9, 3], pad_id=0, seed=12)
    plain = HybridEngine(model, None, EngineConfig(backend="torch")).generate(ids, mask, **GREEDY).sequences
    peft = peft_lora_on_experts(model, ["q_proj", "shared_expert_gate"])
    base = {n: p.detach().clone() for n, p in peft.named_parameters()}
    ours = HybridEngine(peft, None, EngineConfig(backend="torch")).generate(ids, mask, **GREEDY).sequences
    ref = peft.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, plain), "the fused expert LoRA made no difference"
    assert all(torch.equal(p, base[n]) for n, p in peft.named_parameters())


def test_fastrlhf_lora_on_attention_shared_expert_and_dense_layers(tmp_path):
    """fastrlhf LoRA wraps nn.Linear modules: attention, the shared expert (and its gate) and the
    dense MLP layer of a MoE model; the engine fuses them into side buffers as for dense models."""
    from fastrlhf.models.lora import apply_lora, lora_modules
    model = build_tiny("qwen2_moe", tmp_path)
    replaced = apply_lora(model, r=2, alpha=4.0, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                 "down_proj", "shared_expert_gate"])
    assert any("shared_expert." in n for n in replaced) and any("layers.1.mlp.gate_proj" in n for n in replaced)
    g = torch.Generator().manual_seed(1)
    for mod in lora_modules(model):
        mod.lora_b.data.copy_(torch.randn(mod.lora_b.shape, generator=g) * 0.3)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = left_padded_batch([6, 3, 8], pad_id=0, seed=14)
    ours = HybridEngine(model, None, EngineConfig(backend="torch")).generate(ids, mask, **GREEDY).sequences
    assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, **GREEDY))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_triton_fused_moe_inside_generation_equals_torch(tmp_path, monkeypatch):
    """Qwen2-MoE: routed experts, the shared expert and a dense layer, prefill and decode."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = build_tiny("qwen2_moe", tmp_path)
    ids, mask = left_padded_batch([4, 7], pad_id=0, seed=13)
    kw = dict(GREEDY, max_new_tokens=3, min_new_tokens=3, return_logprobs=True)
    outs = {b: HybridEngine(model, None, EngineConfig(backend=b)).generate(ids, mask, **kw)
            for b in ("torch", "triton")}
    assert torch.equal(outs["triton"].sequences, outs["torch"].sequences)
    assert (outs["triton"].logprobs - outs["torch"].logprobs).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------- bad input

def test_unsupported_moe_router_names_it_and_the_supported_ones():
    cfg = AutoConfig.for_model("phimoe", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=16, num_local_experts=4, vocab_size=64)
    with pytest.raises(UnsupportedArchitecture) as e:
        spec_for(cfg)
    msg = str(e.value)
    assert "phimoe" in msg and "sparsemixer" in msg and "softmax_topk" in msg
    assert "mixtral" in msg and "qwen3_moe" in msg and "fallback='hf'" in msg
    # a spec (e.g. a user's own) naming a router the engine's MoE block does not implement
    spec = spec_for(tiny_config("mixtral"))
    bad = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, router_kind="sigmoid_grouped_topk"))
    with pytest.raises(UnsupportedArchitecture, match="router 'sigmoid_grouped_topk'.*supported routers: softmax_topk"):
        check_moe(bad)


def test_tp_size_must_divide_the_experts_intermediate_width():
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
                               num_key_value_heads=8, head_dim=8, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=12, vocab_size=64)
    check_tp_size(cfg, 4, 8)
    with pytest.raises(ValueError, match=r"tp_size=8 does not divide the experts' intermediate width 12.*\[1, 2, 4\]"):
        check_tp_size(cfg, 8, 8)
    q2 = AutoConfig.for_model("qwen2_moe", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=4, num_experts=4, moe_intermediate_size=16,
                              shared_expert_intermediate_size=18, vocab_size=64)
    with pytest.raises(ValueError, match=r"shared expert's intermediate width 18.*\[1, 2\]"):
        check_tp_size(q2, 4)
    assert valid_tp_sizes(8, 8, 8, (12,)) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"olmoe's q/k norms span all attention heads.*\[1\]"):
        check_tp_size(tiny_config("olmoe"), 2)
