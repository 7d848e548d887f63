import torch

from fastrlhf.rlhf.configs import RMConfig
from fastrlhf.models.loading import load_tokenizer
from fastrlhf.models.reward import RewardModel
from fastrlhf.rlhf.reward_trainer import pairwise_loss, train_reward_model
from toys import ToyPairCollator, ToyPairDataset, make_tiny_model_dir, tiny_train_kwargs


def test_pairwise_loss_matches_its_formula():
    chosen, rejected = torch.randn(9), torch.randn(9)
    expected = torch.log1p(torch.exp(-(chosen - rejected))).mean()
    torch.testing.assert_close(pairwise_loss(chosen, rejected), expected)


def test_reward_model_learns_a_separable_preference_and_round_trips(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    cfg = RMConfig(**tiny_train_kwargs(model_dir, str(tmp_path / "rm"), max_steps=16, num_epochs=2,
                                       learning_rate=5e-3, micro_batch_size=8, global_batch_size=8))
    eval_ds = ToyPairDataset(40, seed=1)
    collate = ToyPairCollator(tok.pad_token_id)
    result = train_reward_model(cfg, tokenizer=tok, datasets=(ToyPairDataset(64, seed=0), eval_ds), collate=collate)
    before, after = result["eval_before"], result["eval_after"]
    assert after["accuracy"] >= 0.9, (before, after)
    assert after["chosen_score"] - after["rejected_score"] > before["chosen_score"] - before["rejected_score"] + 0.5
    assert result["losses"][16] < result["losses"][1]

    # the saved model scores the eval pairs exactly as the trained one
    saved = RewardModel.from_pretrained(cfg.output_dir).eval()
    batch = collate([eval_ds[i] for i in range(len(eval_ds))])
    with torch.no_grad():
        live = result["engine"].module.eval().score(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(saved.score(batch["input_ids"], batch["attention_mask"]), live)
        half = len(eval_ds)
        acc = (live[:half] > live[half:]).float().mean().item()
    assert abs(acc - after["accuracy"]) < 1e-9  # the eval metric is what it says
