"""One click: `fastrlhf train` runs steps 1 -> 2 -> 3 (tiny budgets), then `fastrlhf chat` on the result."""
import json
import os

import pytest


@pytest.mark.slow
def test_fastrlhf_train_runs_all_three_steps_then_chat(tmp_path, capsys):
    from fastrlhf.cli import main
    out = tmp_path / "run"
    os.environ["FASTRLHF_NO_PROGRESS"] = "1"
    rc = main(["train", "--output_dir", str(out), "--data.max_samples", "64", "--micro_batch_size", "8",
               "--sft.max_steps", "2", "--rm.max_steps", "2", "--ppo.max_steps", "2", "--ppo.rollout_batch_size", "8",
               "--ppo.eval_prompts", "8", "--ppo.save_steps", "0"])
    assert rc == 0
    ppo_dir = out / "step3_ppo"
    res = json.loads((ppo_dir / "eval_before_after.json").read_text())
    assert set(res["before"]) == {"reward", "gt_score", "kl_to_ref"}
    # the critic started as the reward model (critic_model unset -> reward_model)
    import yaml
    cfg = yaml.safe_load((ppo_dir / "training_config.yaml").read_text())
    assert cfg["reward_model"] == str(out / "step2_rm") and cfg["critic_model"] is None
    assert cfg["model_name_or_path"] == str(out / "step1_sft")
    assert os.path.isfile(ppo_dir / "ppo_curves.png")
    printed = capsys.readouterr()
    assert "before PPO" in printed.out + printed.err
    rc = main(["chat", "--model", str(ppo_dir / "actor"), "--prompt", "Describe the lake in a happy tone.",
               "--max_new_tokens", "8"])
    assert rc == 0
