import torch

from fastrlhf.rlhf.configs import SFTConfig
from fastrlhf.models.loading import load_causal_lm, load_tokenizer
from fastrlhf.rlhf.sft import train_sft
from toys import WORDS, ToySFTCollator, ToySFTDataset, losses_from_metrics, make_tiny_model_dir, tiny_train_kwargs


def _run(tmp_path, model=None, **over):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    cfg = SFTConfig(**tiny_train_kwargs(model_dir, str(tmp_path / "out"), **over))
    result = train_sft(cfg, model=model, tokenizer=tok, datasets=(ToySFTDataset(96, seed=0), ToySFTDataset(24, seed=1)),
                       collate=ToySFTCollator(tok.pad_token_id))
    return result, tok, cfg


def test_sft_loss_decreases_with_accumulation_and_checkpointing(tmp_path):
    result, _, cfg = _run(tmp_path, max_steps=14, num_epochs=2, gradient_checkpointing=True, lr_scheduler="cosine",
                          warmup_steps=2, learning_rate=1e-2)
    losses = result["losses"]
    assert sorted(losses) == list(range(1, 15))  # 96 examples / 8 = 12 steps per epoch, 2 more in epoch 2
    assert sum(list(losses.values())[-3:]) / 3 < 0.85 * sum(list(losses.values())[:3]) / 3
    assert result["eval_after"]["perplexity"] < 0.8 * result["eval_before"]["perplexity"]
    # the logged metrics (tensorboard + jsonl) carry the same per-step losses
    assert losses_from_metrics(cfg.output_dir) == {k: pytest_approx(v) for k, v in losses.items()}


def pytest_approx(v):
    import pytest
    return pytest.approx(v, rel=1e-6)


def test_fastrlhf_lora_trains_only_lora_and_saves_merged(tmp_path):
    result, tok, cfg = _run(tmp_path, max_steps=6, lora_rank=4, lora_alpha=8, only_optimize_lora=True,
                            learning_rate=1e-2)
    trained = result["engine"].module.eval()
    saved = load_causal_lm(cfg.output_dir).eval()  # a plain HF model: LoRA folded into the weights
    assert not any("lora" in n for n, _ in saved.named_parameters())
    ids = torch.randint(5, len(WORDS), (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        # only LoRA was trained: the merged weights differ from the base by exactly scaling * B @ A
        base = load_causal_lm(str(tmp_path / "model"), tokenizer=tok)
        q = trained.model.layers[0].self_attn.q_proj
        delta = saved.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
        assert delta.abs().max() > 0
        torch.testing.assert_close(delta, q.scaling * q.lora_b @ q.lora_a, rtol=1e-4, atol=1e-6)


def test_peft_lora_model_is_accepted_and_saved_merged(tmp_path):
    import peft
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    base = load_causal_lm(model_dir, tokenizer=tok)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    result, _, cfg = _run(tmp_path, model=pm, max_steps=5, learning_rate=1e-2)
    assert result["losses"][5] < result["losses"][1]
    saved = load_causal_lm(cfg.output_dir).eval()
    ids = torch.randint(5, len(WORDS), (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, pm.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_unmerged_fastrlhf_lora_round_trips(tmp_path):
    result, _, cfg = _run(tmp_path, max_steps=3, lora_rank=2, merge_lora_on_save=False, learning_rate=1e-2)
    trained = result["engine"].module.eval()
    loaded = load_causal_lm(cfg.output_dir).eval()
    assert any(n.endswith("lora_a") for n, _ in loaded.named_parameters())
    ids = torch.randint(5, len(WORDS), (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_bf16_zero2_cpu_offload_trains_and_saves(tmp_path):
    import math
    result, _, cfg = _run(tmp_path, max_steps=3, dtype="bf16", zero_stage=2, offload="cpu", learning_rate=1e-2,
                          eval_max_batches=1)
    assert all(math.isfinite(v) for v in result["losses"].values())
    assert result["losses"][3] < result["losses"][1]
    saved = load_causal_lm(cfg.output_dir)
    assert torch.isfinite(saved.get_input_embeddings().weight).all()
