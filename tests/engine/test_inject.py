"""fastrlhf.inject: an HF model's training forward on fastrlhf ops equals HF's, gradients flow."""
import copy

import pytest
import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, get_peft_model

import fastrlhf
from fastrlhf.hybrid_engine.injection import FastLayerNorm, FastRMSNorm
from fastrlhf.models.lora import apply_lora, lora_modules
from conftest import TinyModels, left_padded_batch, no_dropout

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "starcoder2", "opt", "gpt2", "gpt_neox",
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
            # sliding windows (tiny, so the inputs run past them) and local/global layers
            "mistral", "ministral", "gemma3_text", "olmo3", "smollm3",
            "olmo", "olmo2", "phi", "gpt_bigcode", "granite"]
# attention injection needs transformers' attention-mask interface (4.54); OPT and GPT-2 attention
# in 4.x cannot take a 2-D padding mask, so there inject must refuse clearly instead
TRANSFORMERS = Version(Version(transformers.__version__).base_version)  # 5.0.0rc1 counts as 5.0
INJECTABLE_FROM = {"opt": Version("5.0"), "gpt2": Version("5.0")}


def _inject(model, name):
    """fastrlhf.inject(model); None after checking the clear refusal where this transformers is too old."""
    if TRANSFORMERS < Version("4.54"):
        with pytest.raises(NotImplementedError, match=r"needs transformers >= 4\.54.*attention=False"):
            fastrlhf.inject(model)
        return None
    if TRANSFORMERS < INJECTABLE_FROM.get(name, Version("4.54")):
        with pytest.raises(NotImplementedError, match=rf"{name} attention injection needs transformers >= 5\.0.*attention=False"):
            fastrlhf.inject(model)
        return None
    return fastrlhf.inject(model)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return TinyModels(tmp_path_factory, no_dropout)  # built on first use (qwen3 needs 4.51)


def _forward(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_injected_forward_and_grads_equal_hf(models, name):
    ref = copy.deepcopy(models[name])
    fast = _inject(copy.deepcopy(models[name]), name)
    if fast is None:
        return
    assert fast.config._attn_implementation == "fastrlhf"
    assert any(isinstance(m, (FastRMSNorm, FastLayerNorm)) for m in fast.modules())
    ids, mask = left_padded_batch([6, 11, 3], seed=21)
    real = mask.bool()
    out_ref, out_fast = _forward(ref, ids, mask), _forward(fast, ids, mask)
    assert _rel(out_fast[real], out_ref[real]) < 1e-5
    # gradients: same loss on real positions, compare every parameter's gradient
    for m, out in ((ref, out_ref), (fast, out_fast)):
        (out[real].float().log_softmax(-1)[:, 5].sum()).backward()
    grads_ref = dict(ref.named_parameters())
    total = torch.sqrt(sum(p.grad.norm() ** 2 for p in ref.parameters() if p.grad is not None))
    for n, p in fast.named_parameters():
        g_ref = grads_ref[n].grad
        assert p.grad is not None, f"no gradient reached {n}"
        # floor relative to the whole gradient: some are zero in math (a key bias) and pure noise
        assert (p.grad - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-6 * total, n


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_injected_model_generates_like_hf_with_a_kv_cache(models, name):
    """HF's generate on the injected model: its sliding-window cache layers hand the attention the
    last window - 1 keys plus the new one, past the window (5) of Gemma-3's local layers."""
    ref = models[name]
    fast = _inject(copy.deepcopy(ref), name)
    if fast is None:
        return
    ids, mask = left_padded_batch([4, 9], seed=22)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, attention_mask=mask, **kw),
                       ref.generate(input_ids=ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("kind", ["peft", "fastrlhf"])
def test_inject_lora_models(models, kind):
    base = copy.deepcopy(models["llama"])
    if kind == "peft":
        ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "v_proj"]))
    else:
        apply_lora(base, r=4, target_modules=["q_proj", "v_proj"])
        for mod in lora_modules(base):
            mod.lora_b.data.normal_(0, 0.3)
        ref = base
    fast = _inject(copy.deepcopy(ref), "llama")
    if fast is None:
        return
    ids, mask = left_padded_batch([5, 8], seed=23)
    real = mask.bool()
    out_ref, out_fast = _forward(ref, ids, mask), _forward(fast, ids, mask)
    assert _rel(out_fast[real], out_ref[real]) < 1e-5
    out_fast[real].sum().backward()
    lora_grads = [p.grad for n, p in fast.named_parameters() if "lora" in n.lower() and p.requires_grad]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


@pytest.mark.parametrize("name", ["falcon", "bloom", "mpt", "gpt_neo"])
def test_inject_refuses_models_without_the_attention_interface(models, name):
    """Falcon, the ALiBi families (Bloom, MPT; HF computes their bias outside the attention interface)
    and GPT-Neo run their own attention code: inject refuses attention, norms alone work."""
    with pytest.raises(NotImplementedError, match="attention=False"):
        fastrlhf.inject(copy.deepcopy(models[name]))
    # norms alone still work and keep outputs equal
    ref = models[name]
    fast = fastrlhf.inject(copy.deepcopy(ref), attention=False)
    ids, mask = left_padded_batch([4, 7], seed=24)
    real = mask.bool()
    assert _rel(_forward(fast, ids, mask)[real], _forward(ref, ids, mask)[real]) < 1e-5
