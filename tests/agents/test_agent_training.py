"""Step 3 on multi-turn rollouts: GRPO steps on the guess-the-number example environment (the
example's own file and data), every algorithm on trajectories, the update training on exactly the
sampled tokens and never on the environment's, the environment's reward as a source,
rollouts.jsonl (single-turn runs too), and an environment that fails stopping the run before the
update."""
import json
import math
import os

import pytest
import torch

from agent_models import guess  # noqa: F401  (a fixture)
from fastrlhf.errors import AgentError, ConfigError
from fastrlhf.rlhf.configs import PPOConfig
from fastrlhf.rlhf.ppo import PPOTrainer, train_ppo

HERE = os.path.dirname(os.path.abspath(__file__))
ENVS = os.path.join(HERE, "envs.py")
EXAMPLE = os.path.join(HERE, "..", "..", "examples", "guess_number")


def cfg(guess, out, **over):
    kw = dict(model_name_or_path=guess["sft"], env=os.path.join(EXAMPLE, "guess_number.py") + ":GuessNumber",
              algo="grpo", group_size=2, rollout_batch_size=2, micro_batch_size=4, max_steps=2, max_new_tokens=4,
              max_turns=3, eval_prompts=2, learning_rate=1e-3, seed=5, output_dir=str(out), resume="no",
              data=guess["spec"], kl_coef=0.0, log_rollouts=3)
    kw.update(over)
    return PPOConfig(**kw)


def test_grpo_steps_on_the_guess_the_number_example(guess, tmp_path):
    res = train_ppo(cfg(guess, tmp_path / "run"), prompts=guess["train"], eval_prompts=guess["eval"])
    t = res["trainer"]
    assert t.models.reward is None and t.critic is None
    for h in res["history"]:
        assert 1.0 <= h["turns_mean"] <= 3.0 and h["turns_max"] <= 3.0
        assert 0.0 <= h["reward_env_mean"] <= 1.0 and h["skipped_updates"] == 0 and math.isfinite(h["policy_loss"])
        assert {"time_generation", "time_environment", "cut_max_turns", "observation_tokens",
                "logprob_mismatch_abs_turn1", "logprob_mismatch_abs_turn3"} <= set(h)
        assert h["logprob_mismatch_abs_turn1"] < 1e-3   # the engine's log-probs are the trainer's, turn by turn
    lines = [json.loads(x) for x in open(tmp_path / "run" / "rollouts.jsonl")]
    assert [x["step"] for x in lines] == [1, 1, 1, 2, 2, 2]
    for x in lines:
        assert set(x) == {"step", "prompt", "turns", "reward"} and x["prompt"].startswith("Human: guess my number")
        assert [t["role"] for t in x["turns"]][0] == "assistant"
        assert all(t["trained"] == (t["role"] == "assistant") for t in x["turns"])
        assert 0.0 <= x["reward"] <= 1.0
    assert os.path.isfile(tmp_path / "run" / "actor" / "config.json")


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                      "seq_mean_token_sum_norm"])
def test_the_update_trains_on_the_sampled_tokens_and_never_on_the_environments(guess, tmp_path, monkeypatch,
                                                                               loss_agg):
    """Token identity through step 3: every row the update's forward sees is a trajectory's prompt
    and tokens exactly as the engine sampled them (nothing re-tokenized), and the loss (policy, KL
    to the reference, entropy) sends no gradient to an environment token's log-prob or entropy,
    while the generated tokens get some; under every loss aggregation (generated tokens are its
    unit; seq_mean_token_sum_norm divides by the trajectory's generation budget)."""
    import fastrlhf.rlhf.update_losses as update_losses
    t = PPOTrainer(cfg(guess, tmp_path / "ident", max_steps=1, kl_coef=0.1, entropy_coef=0.01, rollout_batch_size=4,
                       reward_fn=[f"{ENVS}:length_reward"], loss_agg=loss_agg),
                   prompts=guess["train"], eval_prompts=guess["eval"])
    assert t.rollouts.generation_budget == 3 * 4   # max_turns x max_new_tokens (not one turn's 4)
    rollouts, seen = [], []
    sample = t.rollouts.rollout
    monkeypatch.setattr(t.rollouts, "rollout", lambda *a, **k: rollouts.append(sample(*a, **k)) or rollouts[-1])
    forward = update_losses.answer_logprobs

    def spy(actor, sequences, attention_mask, prompt_len, **kw):
        logp, entropy = forward(actor, sequences, attention_mask, prompt_len, **kw)
        logp.retain_grad()
        entropy.retain_grad()
        seen.append((sequences, attention_mask, prompt_len, logp, entropy))
        return logp, entropy
    monkeypatch.setattr(update_losses, "answer_logprobs", spy)
    t.train_step()
    (rollout,) = rollouts
    trajs = {tuple(x.prompt_ids + x.tokens): x for x in rollout.trajectories}
    assert any(not all(x.generated) for x in trajs.values())   # some environment turns to mask
    rows = 0
    for sequences, attention_mask, P, logp, entropy in seen:
        for b in range(len(sequences)):
            traj = trajs[tuple(sequences[b][attention_mask[b].bool()].tolist())]
            n = len(traj.tokens)
            assert sequences[b, P:P + n].tolist() == traj.tokens
            generated = torch.tensor(traj.generated)
            for grad in (logp.grad[b], entropy.grad[b]):   # environment tokens and padding: no gradient
                assert torch.all(grad[:n][~generated] == 0) and torch.all(grad[n:] == 0)
            assert logp.grad[b, :n][generated].abs().sum() > 0
            rows += 1
    assert rows == len(rollout.trajectories)


@pytest.mark.parametrize("algo", ["ppo", "rloo", "reinforce++", "reinforce++_baseline"])
def test_every_algorithm_trains_on_trajectories(guess, tmp_path, algo):
    """The environment's reward plus a reward function (the sum: answers differ, so the groups do)."""
    t = PPOTrainer(cfg(guess, tmp_path / algo, algo=algo, max_steps=1, group_size=1 if algo in ("ppo", "reinforce++")
                       else 2, rollout_batch_size=4, reward_fn=[f"{ENVS}:length_reward"]),
                   prompts=guess["train"], eval_prompts=guess["eval"])
    before = [p.detach().clone() for p in t.actor.module.parameters()]
    m = t.train_step()
    assert m["skipped_updates"] == 0 and math.isfinite(m["policy_loss"])
    assert m["reward_mean"] == pytest.approx(m["reward_env_mean"] + m["reward_length_reward_mean"])
    assert any(not torch.equal(a, p) for a, p in zip(before, t.actor.module.parameters()))
    if algo == "ppo":
        assert math.isfinite(m["value_loss"])


def test_a_single_turn_run_logs_its_rollouts_too(guess, tmp_path):
    t = PPOTrainer(cfg(guess, tmp_path / "single", env=None, reward_fn=[f"{ENVS}:add"], max_steps=1,
                       log_rollouts=2), prompts=guess["train"], eval_prompts=guess["eval"])
    # `add` is not a reward function (it takes two ints): replaced by a constant reward for this test
    t.rollouts.rewards.sources = [("const", lambda prompts, completions, **_: [0.5] * len(completions))]
    t.train_step()
    lines = [json.loads(x) for x in open(tmp_path / "single" / "rollouts.jsonl")]
    assert len(lines) == 2 and [len(x["turns"]) for x in lines] == [1, 1]
    assert lines[0]["turns"][0]["role"] == "assistant" and lines[0]["reward"] == 0.5


def test_an_environment_that_raises_stops_the_step_before_the_update(guess, tmp_path):
    t = PPOTrainer(cfg(guess, tmp_path / "raises", env=f"{ENVS}:Raises", max_steps=1),
                   prompts=guess["train"], eval_prompts=guess["eval"])
    before = [p.detach().clone() for p in t.actor.module.parameters()]
    with pytest.raises(AgentError, match=r"environment Raises raised KeyError: 'no such move' .* in step\(\) on the "
                                         r"prompt 'Human: guess my number"):
        t.train_step()
    assert all(torch.equal(a, p) for a, p in zip(before, t.actor.module.parameters()))


@pytest.mark.parametrize("over, message", [
    (dict(tools=["fastrlhf.agents:calculator"]), "--env and --tools together"),
    (dict(max_turns=0), "max_turns"),
    (dict(env="my_env_without_colon"), "--env 'my_env_without_colon' is not 'package.module:class'"),
    (dict(env="missing.py:Env"), "--env 'missing.py:Env': the file .*missing.py does not exist"),
    (dict(env=None, tools=["no_colon"]), "--tools 'no_colon' is not"),
    (dict(max_observation_tokens=0), "max_observation_tokens"),
])
def test_bad_agent_options_are_refused_with_one_line(guess, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg(guess, tmp_path, **over).validate()
    assert "\n" not in str(e.value)


def test_an_env_alone_is_a_reward_source_tools_alone_are_not(guess, tmp_path):
    cfg(guess, tmp_path).validate()   # --env without --reward_fn: its step rewards are the reward
    with pytest.raises(ConfigError, match="step 3 needs a reward"):
        cfg(guess, tmp_path, env=None, tools=["fastrlhf.agents:calculator"]).validate()


def test_multi_turn_steps_packed_with_shared_prompts_log_the_padded_numbers(guess, tmp_path):
    """Step 3 packs by default (each group's prompt once per pass): on trajectories with the
    environment's tokens in them, two GRPO steps log what the padded run logs."""
    runs = {}
    for name, over in (("padded", dict(packing=False)), ("default", {})):
        t = PPOTrainer(cfg(guess, tmp_path / name, kl_coef=0.05, entropy_coef=0.01, **over), prompts=guess["train"],
                       eval_prompts=guess["eval"])
        assert t.cfg.packing is (name == "default")
        runs[name] = [t.train_step() for _ in range(2)]
    for a, b in zip(runs["padded"], runs["default"]):
        assert a.keys() == b.keys()
        for k in a:
            if "time" not in k and not k.endswith("_per_s"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
