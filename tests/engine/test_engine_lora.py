"""LoRA in the engine: generation uses W + s·B·A, and training base weights stay bit-identical.

Both LoRA kinds (fastrlhf LoRALinear, PEFT LoRA), fp32 and bf16. The engine fuses into side
buffers, so 100 fuse/unfuse cycles must leave every base weight torch.equal to its original.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from fastrlhf.models.lora import apply_lora, lora_modules
from conftest import TinyModels, left_padded_batch


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    return TinyModels(tmp_path_factory)


def with_fastrlhf_lora(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    apply_lora(m, r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                  "down_proj", "out_proj", "fc1", "project_in",
                                                  "project_out", "qkv_proj", "gate_up_proj", "c_fc"])
    g = torch.Generator().manual_seed(0)
    for mod in lora_modules(m):  # B starts at zero; make the update real
        mod.lora_b.data.copy_(torch.randn(mod.lora_b.shape, generator=g) * 0.3)
    return m


def with_peft_lora(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    gpt2 = m.config.model_type == "gpt2"
    targets = {"gpt2": ["c_attn", "c_fc"], "phi3": ["qkv_proj", "gate_up_proj", "o_proj"],
               "starcoder2": ["q_proj", "v_proj", "o_proj", "c_fc", "c_proj"]}.get(
        m.config.model_type, ["q_proj", "v_proj", "up_proj", "o_proj"])
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=gpt2,
                     target_modules=targets)
    return get_peft_model(m, cfg)


WRAPPERS = {"fastrlhf": with_fastrlhf_lora, "peft": with_peft_lora}


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora" not in n.lower()}


# fastrlhf's apply_lora wraps nn.Linear only, so GPT-2's Conv1D is covered through PEFT
# (fan_in_fan_out: the transposed-weight fuse path)
@pytest.mark.parametrize("family,kind", [("llama", "fastrlhf"), ("opt", "fastrlhf"), ("llama", "peft"),
                                         ("gpt2", "peft"), ("qwen3", "fastrlhf"), ("qwen3", "peft"),
                                         ("opt_proj", "fastrlhf"), ("phi3", "fastrlhf"), ("phi3", "peft"),
                                         ("gemma", "fastrlhf"), ("gemma", "peft"), ("gemma2", "fastrlhf"),
                                         ("gemma2", "peft"), ("stablelm", "fastrlhf"), ("stablelm", "peft"),
                                         ("stablelm_parallel", "fastrlhf"), ("starcoder2", "fastrlhf"),
                                         ("starcoder2", "peft")])
def test_generation_uses_fused_lora(base_models, kind, family):
    model = WRAPPERS[kind](base_models[family], torch.float32).eval()
    ids, mask = left_padded_batch([4, 9, 6], seed=2)
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    ours = engine.prefill_logits(ids, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        plain = base_models[family](input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    rel = ((ours[real] - ref[real]).norm() / ref[real].norm()).item()
    assert rel < 1e-5, f"engine logits differ from the LoRA model's forward: {rel:.2e}"
    assert ((plain[real] - ref[real]).norm() / ref[real].norm()).item() > 1e-2, "LoRA had no effect"
    # and the same greedy tokens as HF generate on the LoRA model, also for both answers of a
    # prompt computed once (num_return_sequences=2: shared blocks, the fused LoRA on the forks too)
    out = engine.generate(ids, mask, do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0,
                          num_return_sequences=2)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                        min_new_tokens=16, pad_token_id=0)
    assert torch.equal(out.sequences[::2], hf) and torch.equal(out.sequences[1::2], hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fastrlhf", "peft"])
def test_base_weights_bit_identical_after_100_cycles(base_models, kind, dtype):
    model = WRAPPERS[kind](base_models["llama"], dtype)
    before = base_weights(model)
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    ids, mask = left_padded_batch([3, 5], seed=4)
    fused_seen = 0
    for cycle in range(100):
        engine.eval()  # fuse
        fused_seen += sum(lin.fused_lora for lw in engine._weights.layers
                          for lin in (lw.qkv, lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.gate_up, lw.down)
                          if lin is not None)
        if cycle % 25 == 0:
            engine.generate(ids, mask, max_new_tokens=3, generator=cycle, pad_token_id=0)
        engine.train()  # unfuse
    assert fused_seen > 0, "no LoRA weight was fused"
    after = base_weights(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed after fuse/unfuse cycles"
    # generate() outside an explicit eval() does its own cycle, and leaves nothing fused behind
    engine.generate(ids, mask, max_new_tokens=2, pad_token_id=0)
    assert engine._weights is None and not engine.in_inference
