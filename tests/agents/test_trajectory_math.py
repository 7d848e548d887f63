"""A two-turn trajectory by hand: its tensors (only the model's tokens, each turn's EOS included,
carry loss) and its advantages (GAE and returns over generated tokens only: the environment's
tokens take no time step, the last token of turn 1 bootstraps from turn 2's first value)."""
import pytest
import torch

from fastrlhf.agents.trajectory import Trajectory, rollout_log_record, to_rollout_tensors, trajectory_metrics
from fastrlhf.rlhf import rl_math as M
from fastrlhf.rlhf.algorithms import AdvantageSettings, compute_advantages

EOS, PAD = 2, 0


def two_turns():
    """prompt [1, 7, 8]; model turn 1 = [11, 12, EOS]; environment [21, 22]; model turn 2 = [13, EOS]."""
    t = Trajectory("p", [1, 7, 8], {})
    t.add_model_turn([11, 12, EOS], [-0.1, -0.2, -0.3], "a b")
    t.add_environment_turn([21, 22], "obs")
    t.add_model_turn([13, EOS], [-0.4, -0.5], "c")
    t.step_rewards += [0.25, 0.75]
    return t


def test_the_tensors_of_a_two_turn_trajectory():
    short = Trajectory("q", [5], {})
    short.add_model_turn([14, EOS], [-0.6, -0.7], "d")
    out = to_rollout_tensors([two_turns(), short], PAD)
    assert out["prompt_len"] == 3
    assert out["sequences"].tolist() == [[1, 7, 8, 11, 12, EOS, 21, 22, 13, EOS],
                                         [PAD, PAD, 5, 14, EOS, PAD, PAD, PAD, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert out["action_mask"].tolist() == [[1, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]]
    assert out["turn_index"].tolist() == [[1, 1, 1, 0, 0, 2, 2], [1, 1, 0, 0, 0, 0, 0]]
    assert out["engine_logprobs"][0].tolist() == pytest.approx([-0.1, -0.2, -0.3, 0, 0, -0.4, -0.5])
    assert two_turns().env_reward == 1.0
    m = trajectory_metrics([two_turns(), short])
    assert (m["turns_mean"], m["turns_max"], m["observation_tokens"]) == (1.5, 2.0, 1.0)
    rec = rollout_log_record(3, "p", two_turns().turns, 1.0)
    assert rec == {"step": 3, "prompt": "p", "reward": 1.0, "turns": [
        {"role": "assistant", "text": "a b", "trained": True}, {"role": "environment", "text": "obs", "trained": False},
        {"role": "assistant", "text": "c", "trained": True}]}


MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
# critic values at each answer column; the environment columns hold junk that must not matter
VALUES = torch.tensor([[0.5, 0.4, 0.3, 9.0, -9.0, 0.2, 0.1]])


def test_gae_over_generated_tokens_only_by_hand():
    rewards = M.token_rewards(torch.tensor([1.0]), torch.zeros(1, 7), MASK, 0.0)
    assert rewards.tolist() == [[0, 0, 0, 0, 0, 0, 1.0]]        # the score on the last generated token
    adv, ret = M.gae(rewards, VALUES, MASK, gamma=0.9, lam=0.5)
    # t=6: d = 1 - 0.1 = 0.9                         A6 = 0.9
    # t=5: d = 0.9*0.1 - 0.2 = -0.11                 A5 = -0.11 + 0.45*0.9 = 0.295
    # t=4, 3: environment tokens: skipped (A = 0; V(t') stays 0.2, A(t') stays 0.295)
    # t=2: d = 0.9*0.2 - 0.3 = -0.12 (turn 1's EOS bootstraps from turn 2's first value)
    #                                                A2 = -0.12 + 0.45*0.295 = 0.01275
    # t=1: d = 0.9*0.3 - 0.4 = -0.13                 A1 = -0.13 + 0.45*0.01275 = -0.1242625
    # t=0: d = 0.9*0.4 - 0.5 = -0.14                 A0 = -0.14 + 0.45*(-0.1242625) = -0.195918125
    expect = [-0.195918125, -0.1242625, 0.01275, 0.0, 0.0, 0.295, 0.9]
    assert adv[0].tolist() == pytest.approx(expect, abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a + v if m else 0.0 for a, v, m in
                                             zip(expect, VALUES[0].tolist(), MASK[0].tolist())], abs=1e-6)
    # the same trajectory without the environment's columns gives the same numbers
    keep = MASK[0] > 0
    adv2, _ = M.gae(rewards[:, keep], VALUES[:, keep], MASK[:, keep], 0.9, 0.5)
    assert adv2[0].tolist() == pytest.approx([e for e, k in zip(expect, keep.tolist()) if k], abs=1e-6)


def test_discounted_returns_skip_environment_tokens_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 0.0, 5.0, 5.0, 0.0, 1.0]])   # junk on environment columns
    out = M.discounted_returns(rewards, MASK, gamma=0.5)
    # G6 = 1; G5 = 0 + 0.5*1 = 0.5; G2 = 0 + 0.5*0.5 = 0.25; G1 = -0.1 + 0.125 = 0.025; G0 = 0.0125
    assert out[0].tolist() == pytest.approx([0.0125, 0.025, 0.25, 0.0, 0.0, 0.5, 1.0])


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo", "reinforce++", "reinforce++_baseline"])
def test_every_algorithm_puts_advantages_on_generated_tokens_only(algo):
    mask = MASK.repeat(2, 1)
    mask[1, 5:] = 0     # the second trajectory has one turn
    scores = torch.tensor([1.0, 0.0])
    values = VALUES.repeat(2, 1) if algo == "ppo" else None
    s = AdvantageSettings(algo=algo, group_size=2, whiten_advantages=False, kl_in_reward=False, reward_clip=None)
    adv, _, _ = compute_advantages(s, scores, mask, None, None, values, 0.0)
    assert bool((adv[mask == 0] == 0).all())
    assert bool((adv[mask > 0] != 0).any())
    if algo in ("grpo", "rloo"):   # a group's sequence advantage on every generated token of the trajectory
        assert adv[0, 0] > 0 and len({round(x, 6) for x in adv[0][MASK[0] > 0].tolist()}) == 1
