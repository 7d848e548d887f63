"""DPO: the answer mask, the loss at the start (policy == reference), and a short training run."""
import json
import math

import pytest
import torch

from fastrlhf.rlhf.dpo import DPOConfig, answer_mask_after_common_prefix, dpo_batch_loss, train_dpo


def test_answer_mask_starts_where_chosen_and_rejected_differ():
    # pair 1: prompt [5, 6], answers [7, 8, 2] vs [9, 2] (right padded with 0)
    # pair 2: prompt [5], answers [3, 4, 2] vs [3, 1, 2]: the shared answer token 3 is masked too
    ids = torch.tensor([[5, 6, 7, 8, 2], [5, 3, 4, 2, 0],
                        [5, 6, 9, 2, 0], [5, 3, 1, 2, 0]])
    att = (torch.arange(5)[None] < torch.tensor([5, 4, 4, 4])[:, None]).long()
    m = answer_mask_after_common_prefix(ids, att)
    # columns 1..4 are the predicted tokens
    assert m.tolist() == [[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from fastrlhf.tasks.default_task import default_data_path
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("dpo_model")
    tok = load_tokenizer(None)
    load_causal_lm(None, seed=5).save_pretrained(d)
    tok.save_pretrained(d)
    rows = [json.loads(line) for line in open(default_data_path())][:40]
    items = []
    for r in rows:
        p = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
        enc = lambda a: torch.tensor(p + tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        items.append({"chosen_input_ids": enc(r["chosen"]), "rejected_input_ids": enc(r["rejected"])})
    return {"dir": str(d), "tok": tok, "items": items}


def test_loss_is_log2_when_policy_equals_reference(pairs):
    from fastrlhf.data.collators import PairCollator
    from fastrlhf.models.loading import load_causal_lm
    model = load_causal_lm(pairs["dir"]).eval()
    batch = PairCollator(pairs["tok"].pad_token_id)(pairs["items"][:4])
    with torch.no_grad():
        loss, st = dpo_batch_loss(model, model, batch, beta=0.1, label_smoothing=0.0)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert st["reward_margin"].item() == 0.0


def test_dpo_training_raises_the_margin_on_its_pairs(pairs, tmp_path):
    cfg = DPOConfig(model_name_or_path=pairs["dir"], output_dir=str(tmp_path / "dpo"), micro_batch_size=8,
                    max_steps=6, learning_rate=2e-3, beta=0.5, log_steps=1, eval_batch_size=8)
    train = pairs["items"][:32]
    r = train_dpo(cfg, tokenizer=pairs["tok"], datasets=(train, train[:16]))
    assert r["eval_before"]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert r["eval_after"]["loss"] < r["eval_before"]["loss"] - 0.05
    assert r["eval_after"]["reward_margin"] > 0
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")  # saved in HF format
