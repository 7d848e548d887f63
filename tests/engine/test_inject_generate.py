"""fastrlhf.inject(model, generate=True): model.generate runs in the hybrid engine with HF's
outputs (greedy token-identical on every supported family), seeded sampling is reproducible,
unsupported arguments go to HF's generate and say so once, and a generate leaves the training
state (weights, requires_grad, train/eval modes, optimizer state) as it was."""
import copy

import pytest
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

import fastrlhf
from fastrlhf.hybrid_engine import HybridEngine
from fastrlhf.hybrid_engine.injection import EngineGenerate
from conftest import FAMILY_OF, TINY_CONFIGS, left_padded_batch

ONE_PER_FAMILY = sorted(name for name in TINY_CONFIGS if name not in FAMILY_OF) + ["opt_proj", "falcon_alibi"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def _generate_only(model):
    return fastrlhf.inject(copy.deepcopy(model), attention=False, norms=False, generate=True)


@pytest.fixture
def engine_calls(monkeypatch):
    calls = []
    real = HybridEngine.generate

    def spy(self, *a, **k):
        calls.append(k)
        return real(self, *a, **k)
    monkeypatch.setattr(HybridEngine, "generate", spy)
    return calls


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_greedy_equals_hf_on_every_family(models, name, engine_calls):
    ref = models[name]
    fast = _generate_only(ref)
    ids, mask = left_padded_batch([5, 8], pad_id=0, seed=7)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)  # the model's own EOS ids stop rows
    ours = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(engine_calls) == 1, "the call did not reach the hybrid engine"
    assert torch.equal(ours, ref.generate(input_ids=ids, attention_mask=mask, **kw)), name


def test_return_dict_mask_inference_and_lengths_like_hf(models, engine_calls):
    ref = models["qwen2"]
    fast = _generate_only(ref)
    ids, mask = left_padded_batch([4, 7], pad_id=0, seed=8)
    # no attention_mask: HF infers it from the pad tokens in the inputs; max_length counts the prompt
    kw = dict(max_length=ids.shape[1] + 6, min_new_tokens=4, do_sample=False, pad_token_id=0,
              eos_token_id=5, return_dict_in_generate=True)
    ours, theirs = fast.generate(ids, **kw), ref.generate(ids, **kw)
    assert isinstance(ours, GenerateDecoderOnlyOutput) and ours.sequences.dtype == torch.long
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(engine_calls[0]["attention_mask"], mask)


def test_seeded_sampling_is_reproducible(models, engine_calls):
    fast = _generate_only(models["llama"])
    ids, mask = left_padded_batch([6, 3, 8], pad_id=0, seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
              pad_token_id=0)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(fast.generate(ids, **kw))
    assert len(engine_calls) == 3
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert engine_calls[0]["top_k"] == 20 and engine_calls[0]["top_p"] == 0.9


def test_num_return_sequences_samples_in_the_engine_in_hf_order(models, engine_calls):
    ref = models["llama"]
    fast = _generate_only(ref)
    ids, mask = left_padded_batch([6, 3], pad_id=0, seed=13)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(4)
    ours = fast.generate(ids, **kw)
    torch.manual_seed(4)
    theirs = ref.generate(ids, **kw)
    assert len(engine_calls) == 1 and engine_calls[0]["num_return_sequences"] == 3
    assert ours.shape[0] == theirs.shape[0] == 6  # rows b*3 .. b*3+2 answer prompt b, as HF's do
    assert torch.equal(ours[:, :ids.shape[1]], theirs[:, :ids.shape[1]])
    with pytest.raises(ValueError, match="num_return_sequences"):  # HF's own refusal, unchanged
        fast.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_return_sequences=2)
    assert len(engine_calls) == 1


def test_unsupported_argument_falls_back_to_hf_and_says_so_once(models, engine_calls, capsys):
    ref = models["llama"]
    fast = _generate_only(ref)
    ids, mask = left_padded_batch([5, 7], pad_id=0, seed=10)
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=4, do_sample=False, pad_token_id=0)
    first, second = fast.generate(ids, **kw), fast.generate(ids, **kw)
    assert not engine_calls
    assert torch.equal(first, ref.generate(ids, **kw)) and torch.equal(first, second)
    out = capsys.readouterr().out
    assert out.count("'num_beams'") == 1 and "HF's generate" in out
    fast.generate(ids, attention_mask=mask, max_new_tokens=3, use_cache=False, pad_token_id=0)
    assert not engine_calls and "use_cache=False" in capsys.readouterr().out


def test_a_configs_use_cache_false_still_generates_in_the_engine(models, engine_calls):
    """MPT's configs say use_cache=False (a training-memory default): generate is the engine's."""
    ref = models["mpt"]
    assert ref.generation_config.use_cache is False
    ids, mask = left_padded_batch([5, 8], pad_id=0, seed=13)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(_generate_only(ref).generate(ids, **kw), ref.generate(ids, **kw))
    assert len(engine_calls) == 1


def test_generate_leaves_the_training_state_as_it_was(models):
    model = copy.deepcopy(models["llama"])
    model.config.attention_dropout = 0.1
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, mask = left_padded_batch([6, 4], pad_id=0, seed=11)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    fastrlhf.inject(model, attention=False, norms=False, generate=True)
    before = ({n: p.detach().clone() for n, p in model.named_parameters()},
              {n: p.requires_grad for n, p in model.named_parameters()},
              {n: m.training for n, m in model.named_modules()},
              copy.deepcopy(opt.state_dict()))
    torch.manual_seed(0)
    model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    assert isinstance(model.__dict__["generate"], EngineGenerate) and model.generate._engine is not None
    params, flags, modes, state = before
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        assert all(torch.equal(v[f], after["state"][k][f]) for f in v)


def test_generate_needs_an_engine_family(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from fastrlhf.hybrid_engine import UnsupportedArchitecture
    cfg = AutoConfig.for_model("codegen", n_embd=32, n_layer=1, n_head=4, vocab_size=64, rotary_dim=4)
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        fastrlhf.inject(AutoModelForCausalLM.from_config(cfg), attention=False, generate=True)


def test_peft_lora_model_generates_through_the_engine(models, engine_calls):
    from peft import LoraConfig, get_peft_model
    ref = get_peft_model(copy.deepcopy(models["llama"]), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                     target_modules=["q_proj", "v_proj"]))
    fast = fastrlhf.inject(copy.deepcopy(ref), attention=False, norms=False, generate=True)
    ids, mask = left_padded_batch([5, 8], pad_id=0, seed=12)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw))
    assert len(engine_calls) == 1
