import os

import pytest
import torch

from fastrlhf.models.loading import PAD_TOKEN, load_causal_lm, load_tokenizer
from fastrlhf.models.reward import RewardModel, last_token_index
from toys import WORDS, make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny")), with_weights=True)


def test_pad_token_added_and_embeddings_resized_to_multiple_of_8(model_dir):
    tok = load_tokenizer(model_dir)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == len(WORDS)  # a new token, not EOS
    model = load_causal_lm(model_dir, tokenizer=tok)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 8 == 0 and rows < len(tok) + 8
    assert model.config.pad_token_id == tok.pad_token_id
    # the original rows are the saved weights, untouched by the resize
    plain = load_causal_lm(model_dir)
    assert plain.get_input_embeddings().weight.shape[0] == len(WORDS)
    torch.testing.assert_close(model.get_input_embeddings().weight[:len(WORDS)], plain.get_input_embeddings().weight)


def test_config_only_dir_builds_the_same_model_for_the_same_seed(tmp_path):
    d = make_tiny_model_dir(str(tmp_path / "cfg_only"))
    tok = load_tokenizer(d)
    a, b = load_causal_lm(d, tokenizer=tok, seed=3), load_causal_lm(d, tokenizer=tok, seed=3)
    c = load_causal_lm(d, tokenizer=tok, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


def _rows(n_rows, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(2, 9, (n_rows,), generator=g)]
    return [torch.randint(5, len(WORDS), (n,), generator=g) for n in lengths]


def _pad(rows, pad_id, left):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_reward_score_is_the_value_at_the_last_real_token(model_dir, left):
    tok = load_tokenizer(model_dir)
    rm = RewardModel.from_pretrained(model_dir, tokenizer=tok, seed=1).eval()
    with torch.no_grad():
        torch.nn.init.normal_(rm.v_head.weight)  # a non-trivial head so positions differ clearly
    rows = _rows(7, seed=11)
    ids, mask = _pad(rows, tok.pad_token_id, left)
    with torch.no_grad():
        values = rm(ids, mask)
        scores = rm.score(ids, mask)
    expected_idx = [ids.shape[1] - 1 if left else len(r) - 1 for r in rows]  # explicit per-row index
    assert last_token_index(mask).tolist() == expected_idx
    torch.testing.assert_close(scores, torch.stack([values[i, j] for i, j in enumerate(expected_idx)]))
    # and each score equals that of the row alone, unpadded: padding side does not matter
    with torch.no_grad():
        alone = torch.stack([rm.score(r[None], torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
    torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)


def test_reward_model_save_load_round_trip(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    rm = RewardModel.from_pretrained(model_dir, tokenizer=tok, seed=2).eval()
    with torch.no_grad():
        rm.v_head.bias.fill_(0.75)
    rm.save_pretrained(str(tmp_path / "rm"))
    assert {"config.json", "value_head.safetensors", "reward_model.json"} <= set(os.listdir(tmp_path / "rm"))
    back = RewardModel.from_pretrained(str(tmp_path / "rm")).eval()
    ids, mask = _pad(_rows(4, seed=5), tok.pad_token_id, left=False)
    with torch.no_grad():
        torch.testing.assert_close(back.score(ids, mask), rm.score(ids, mask))


def test_reward_model_initialised_from_a_causal_lm_checkpoint(model_dir):
    lm = load_causal_lm(model_dir)
    rm = RewardModel.from_pretrained(model_dir)
    lm_sd = lm.model.state_dict()
    for name, p in rm.backbone.state_dict().items():
        torch.testing.assert_close(p, lm_sd[name], msg=name)


def test_peft_adapter_dir_is_loaded_with_its_base(model_dir, tmp_path):
    import peft
    base = load_causal_lm(model_dir)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_causal_lm(str(tmp_path / "adapter"))
    assert type(loaded).__name__.startswith("Peft")
    ids = torch.randint(5, len(WORDS), (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("merge", [True, False])
def test_reward_model_with_lora_saves_merged_or_apart(model_dir, tmp_path, merge):
    from fastrlhf.models.lora import apply_lora
    from fastrlhf.rlhf.checkpoint import save_hf_model
    rm = RewardModel.from_pretrained(model_dir, seed=4).eval()
    apply_lora(rm, r=2, alpha=4, target_modules=["q_proj", "down_proj"])
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if n.endswith("lora_b"):
                p.normal_()
    save_hf_model(rm, str(tmp_path / "rm"), merge_lora=merge)
    back = RewardModel.from_pretrained(str(tmp_path / "rm")).eval()
    assert any(n.endswith("lora_a") for n, _ in back.named_parameters()) == (not merge)
    ids, mask = _pad(_rows(5, seed=9), 0, left=True)
    with torch.no_grad():
        torch.testing.assert_close(back.score(ids, mask), rm.score(ids, mask), rtol=1e-4, atol=1e-5)
