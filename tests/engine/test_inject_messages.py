"""What `fastrlhf.inject` says to a user who holds it wrong: sampling at temperature 0 (as HF's
generate does: refused), attention dropout named by the model's own setting, a module that is not
an HF model, empty inputs. Each a clear error, never a silent change or a deep AttributeError."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fastrlhf


def tiny(model_type, **extra):
    cfg = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64).eval()


def test_sampling_at_temperature_zero_is_refused_as_hf_refuses_it(llama):
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match=r"temperature.*=0\.0.*strictly positive") as hf_error:
        llama.generate(ids, do_sample=True, temperature=0.0, max_new_tokens=3)
    fastrlhf.inject(llama, generate=True)
    with pytest.raises(ValueError, match=r"temperature.*=0\.0.*strictly positive.*do_sample=False"):
        llama.generate(ids, do_sample=True, temperature=0.0, max_new_tokens=3)
    assert "do_sample=False" in str(hf_error.value)
    # greedy with a temperature of 0 is greedy, as in HF
    assert llama.generate(ids, do_sample=False, temperature=0.0, max_new_tokens=3).shape == (1, 6)


@pytest.mark.parametrize("shape", [(1, 0), (0, 4)])
def test_empty_inputs_are_a_clear_error(llama, shape):
    fastrlhf.inject(llama, generate=True)
    with pytest.raises(ValueError, match=rf"empty inputs \(shape \({shape[0]}, {shape[1]}\)\)"):
        llama.generate(torch.zeros(shape, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match=rf"empty inputs \(shape \({shape[0]}, {shape[1]}\)\)"):
        llama(torch.zeros(shape, dtype=torch.long))


def test_attention_dropout_is_named_by_the_models_own_setting():
    gpt2 = tiny("gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=32, attn_pdrop=0.1).train()
    fastrlhf.inject(gpt2)
    with pytest.raises(NotImplementedError, match=r"set the model's attn_pdrop \(now 0\.1\) to 0\.0"):
        gpt2(torch.tensor([[3, 4, 5]]))
    llama = tiny("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, attention_dropout=0.2).train()
    fastrlhf.inject(llama)
    with pytest.raises(NotImplementedError, match=r"set the model's attention_dropout \(now 0\.2\) to 0\.0"):
        llama(torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("generate", [False, True])
def test_a_module_that_is_not_an_hf_model_is_named(generate):
    with pytest.raises(TypeError, match=r"inject\(\) takes a transformers model .*got a Linear"):
        fastrlhf.inject(torch.nn.Linear(4, 4), generate=generate)
