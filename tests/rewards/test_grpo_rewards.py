"""Step 3 with reward functions and no reward model, on the bundled arithmetic task (random
weights, a few tiny steps): the columns reach the function, samples without a reward leave the
loss, and a failing function stops the run before the update with the last checkpoint intact."""
import math
import os

import pytest
import torch

from fastrlhf.errors import RewardError
from fastrlhf.rlhf.configs import PPOConfig
from fastrlhf.rlhf.ppo import PPOTrainer, train_ppo

FNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fns.py")


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    from fastrlhf.data import DataSpec, build_datasets
    from fastrlhf.tasks.arithmetic_task import arithmetic_data_path, arithmetic_model_dir
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("arith")
    tok = load_tokenizer(arithmetic_model_dir(), padding_side="left")
    load_causal_lm(arithmetic_model_dir(), seed=3).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    rows = open(arithmetic_data_path()).readlines()[:60]   # a small file of the task's rows (prompt/response/answer)
    (root / "arith.jsonl").write_text("".join(rows))
    spec = DataSpec(paths=[str(root / "arith.jsonl")], split_ratios="0,0,1", eval_fraction=0.2)
    train, evals = build_datasets(spec, tok, 3)
    return {"sft": str(root / "sft"), "train": [train[i] for i in range(len(train))],
            "eval": [evals[i] for i in range(len(evals))], "spec": spec}


def cfg(arith, out, **over):
    kw = dict(model_name_or_path=arith["sft"], reward_fn=["fastrlhf.rewards:arithmetic_reward"], algo="grpo",
              group_size=2, rollout_batch_size=4, micro_batch_size=4, max_steps=2, max_new_tokens=6, eval_prompts=2,
              learning_rate=1e-3, seed=5, output_dir=str(out), resume="no", data=arith["spec"])
    kw.update(over)
    return PPOConfig(**kw)


def trainer(arith, out, **over):
    return PPOTrainer(cfg(arith, out, **over), prompts=arith["train"], eval_prompts=arith["eval"])


def test_grpo_trains_on_the_arithmetic_task_with_a_reward_function_only(arith, tmp_path):
    assert "answer" in arith["train"][0]["columns"]
    res = train_ppo(cfg(arith, tmp_path / "run"), prompts=arith["train"], eval_prompts=arith["eval"])
    t = res["trainer"]
    assert t.models.reward is None and t.critic is None   # no reward model was needed, or loaded
    for h in res["history"]:
        assert 0.0 <= h["reward_arithmetic_reward_mean"] <= 1.0 and h["rewardless_samples"] == 0
        assert h["skipped_updates"] == 0 and math.isfinite(h["policy_loss"])
    assert set(res["eval_before"]) == {"reward", "kl_to_ref"}
    assert os.path.isfile(tmp_path / "run" / "actor" / "config.json")


def test_samples_without_reward_are_left_out_of_the_loss(arith, tmp_path):
    t = trainer(arith, tmp_path / "odd", reward_fn=[f"{FNS}:none_for_odd_rows"], kl_coef=0.1)
    exp = t.rollouts.make(arith["train"][:4], 0.1)
    assert exp.sample_mask.tolist() == [1.0, 0.0] * 4
    assert exp.action_mask[1::2].sum() == 0 and (exp.action_mask[0::2].sum(1) > 0).all()
    assert exp.advantages[1::2].abs().sum() == 0
    assert exp.info["rewardless_samples"] == 4.0
    # with no sample rewarded, nothing is learned: the parameters do not move at all
    none = trainer(arith, tmp_path / "none", reward_fn=[f"{FNS}:none_for_all"], kl_coef=0.1)
    before = {n: p.detach().clone() for n, p in none.actor.module.named_parameters()}
    m = none.train_step()
    assert m["rewardless_samples"] == 8.0 and m["skipped_updates"] == 0
    for n, p in none.actor.module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_raising_reward_function_stops_the_run_before_the_update_keeping_the_checkpoint(arith, tmp_path):
    out = tmp_path / "raise"
    t = trainer(arith, out, reward_fn=[f"{FNS}:raises_after_first_batch"], save_steps=1, max_steps=3)
    real_step = t.train_step
    snapshot = {}

    def step_and_snapshot():
        m = real_step()
        snapshot.update({n: p.detach().clone() for n, p in t.actor.module.named_parameters()})
        return m
    t.train_step = step_and_snapshot
    with pytest.raises(RewardError, match=r"raises_after_first_batch raised ValueError: no score for .* on one "
                                          r"offending prompt: 'Human: .*\?\\n\\nAssistant:'"):
        t.train()
    assert t.step == 1
    for n, p in t.actor.module.named_parameters():   # the failed step made no optimizer step
        assert torch.equal(p, snapshot[n]), n
    from transformers import AutoModelForCausalLM
    assert os.path.isfile(out / "checkpoint-1" / "trainer_state.json")
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")   # intact, loadable
    assert not os.path.exists(out / "checkpoint-2")


def test_ppo_with_a_reward_function_starts_its_critic_from_the_actor(arith, tmp_path):
    t = trainer(arith, tmp_path / "ppo", algo="ppo", group_size=1, rollout_batch_size=4, max_steps=1,
                reward_fn=[f"{FNS}:none_for_odd_rows"])
    assert t.models.reward is None and t.critic is not None
    actor_sd = t.actor.module.state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(t.critic.module.backbone.state_dict()[k[len("model."):]], actor_sd[k])
    m = t.train_step()
    assert math.isfinite(m["value_loss"]) and m["rewardless_samples"] == 2.0 and m["skipped_updates"] == 0
