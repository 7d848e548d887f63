"""RL math on small hand-computed cases (the expected numbers are worked out in the comments)."""
import math

import pytest
import torch

from fastrlhf.rlhf import rl_math as M


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_four_token_example_by_hand():
    # gamma = 0.9, lam = 0.5, so gamma * lam = 0.45
    # d3 = 1.0 - 0.2 = 0.8                      A3 = 0.8
    # d2 = -0.2 + 0.9*0.2 - 0.3 = -0.32          A2 = -0.32 + 0.45*0.8 = 0.04
    # d1 = 0 + 0.9*0.3 - 0.4 = -0.13             A1 = -0.13 + 0.45*0.04 = -0.112
    # d0 = 0.1 + 0.9*0.4 - 0.5 = -0.04           A0 = -0.04 + 0.45*(-0.112) = -0.0904
    # second row ends after 2 tokens (mask 1,1,0,0); its junk after the end must not leak:
    # A1 = 1 - 0.4 = 0.6, A0 = 0 + 0.9*0.4 - 0.5 + 0.45*0.6 = 0.13
    rewards = t([0.1, 0.0, -0.2, 1.0], [0.0, 1.0, 7.0, 7.0])
    values = t([0.5, 0.4, 0.3, 0.2], [0.5, 0.4, 9.0, 9.0])
    mask = t([1, 1, 1, 1], [1, 1, 0, 0])
    adv, ret = M.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([-0.0904, -0.112, 0.04, 0.8], [0.13, 0.6, 0, 0]))
    torch.testing.assert_close(ret, t([0.4096, 0.288, 0.34, 1.0], [0.63, 1.0, 0, 0]))


def test_gae_gamma_lambda_one_is_return_minus_value():
    rewards, values = t([0.0, 0.0, 0.0, 1.0]), t([0.5, 0.4, 0.3, 0.2])
    adv, ret = M.gae(rewards, values, torch.ones_like(rewards), 1.0, 1.0)
    torch.testing.assert_close(adv, 1.0 - values)
    torch.testing.assert_close(ret, torch.ones_like(rewards))


def test_kl_estimators_by_hand():
    logp, ref = t([math.log(2.0), 0.0]), t([0.0, 0.0])
    torch.testing.assert_close(M.kl_estimate(logp, ref, "k1"), t([math.log(2.0), 0.0]))
    # k3 = exp(-d) - 1 + d = 0.5 - 1 + ln 2
    torch.testing.assert_close(M.kl_estimate(logp, ref, "k3"), t([math.log(2.0) - 0.5, 0.0]))
    torch.testing.assert_close(M.kl_estimate(logp, ref, "k2"), t([0.5 * math.log(2.0) ** 2, 0.0]))
    with pytest.raises(ValueError, match="k1"):
        M.kl_estimate(logp, ref, "k9")


def test_kl_penalty_on_every_answer_token_and_clipped_score_on_the_last():
    kl = t([0.2, -0.1, 0.3, 5.0], [0.4, 5.0, 5.0, 5.0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])  # row 2: a one-token (EOS only) answer
    scores = t(3.0, -0.5)
    r = M.token_rewards(scores, kl, mask, kl_coef=0.1, reward_clip=2.0)
    # row 1: -0.1*kl, score 3 clipped to 2 lands on index 2 (last real token), nothing after
    torch.testing.assert_close(r, t([-0.02, 0.01, -0.03 + 2.0, 0.0], [-0.04 - 0.5, 0, 0, 0]))


def test_reward_position_with_left_padded_prompt_and_eos_then_pad():
    pad, eos = 0, 2
    # prompts left padded to 4, answers of 4 slots: "7 2 0 0" ends at EOS, "5 6 8 9" never ends
    seqs = torch.tensor([[0, 0, 11, 12, 7, 2, 0, 0],
                         [0, 13, 14, 15, 5, 6, 8, 9]])
    answer = seqs[:, 4:]
    mask = M.answer_mask(answer, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert M.last_index(mask).tolist() == [1, 3]
    # whole-sequence attention mask -> the token the reward model scores
    prompt_mask = (seqs[:, :4] != pad).float()
    full = torch.cat([prompt_mask, mask], 1)
    assert M.last_index(full).tolist() == [5, 7]
    # pad == eos (GPT-2 style): the first EOS still ends the answer, padding after is masked
    m2 = M.answer_mask(torch.tensor([[7, 2, 2, 2], [2, 2, 2, 2]]), eos_token_id=2)
    assert m2.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert M.last_index(torch.zeros(1, 3)).tolist() == [-1]


def test_clipped_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1 (and a masked junk token); eps 0.2
    # t0: A=1:  max(-1.5, -1.2) = -1.2 (clipped)   t1: A=-1: max(0.5, 0.8) = 0.8 (clipped)
    # t2: A=2:  max(-2.2, -2.2) = -2.2 (not)       mean = -2.6 / 3
    logp = torch.log(t([1.5, 0.5, 1.1, 100.0]))
    old = torch.zeros_like(logp)
    adv = t([1.0, -1.0, 2.0, 50.0])
    mask = t([1, 1, 1, 0])
    loss, stats = M.clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-2.6 / 3)
    assert stats["policy_clipfrac"].item() == pytest.approx(2 / 3)
    k3 = [1 / r - 1 + math.log(r) for r in (1.5, 0.5, 1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3)


def test_clipped_policy_loss_gradient_is_zero_on_clipped_tokens():
    logp = torch.log(t([1.5, 1.1])).requires_grad_()
    loss, _ = M.clipped_policy_loss(logp, torch.zeros(2, dtype=torch.float64), t([1.0, 1.0]),
                                    t([1, 1]), 0.2)
    loss.backward()
    # d/dlogp of -A r / 2 = -r / 2 on the unclipped token only
    torch.testing.assert_close(logp.grad, t([0.0, -0.55]))


def test_clipped_value_loss_by_hand():
    # t0: V=1, old=.5, R=1: err 0, clipped V=.7 -> .09; max .09 (clipped branch)
    # t1: V=0, old=.5, R=1: err 1, clipped V=.3 -> .49; max 1
    # loss = 0.5 * (0.09 + 1) / 2 = 0.2725
    loss, stats = M.clipped_value_loss(t([1.0, 0.0, 3.0]), t([0.5, 0.5, 0.0]), t([1.0, 1.0, 0.0]),
                                       t([1, 1, 0]), clip=0.2)
    assert loss.item() == pytest.approx(0.2725)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)
    plain, _ = M.clipped_value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([1.0, 1.0]), t([1, 1]), clip=None)
    assert plain.item() == pytest.approx(0.25)


def test_masked_whiten_by_hand():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    # mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    torch.testing.assert_close(M.masked_whiten(x, mask, eps=0.0), t([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(M.masked_whiten(x, mask, shift_mean=False, eps=0.0), t([1.0, 2.0, 3.0, 0.0]))
    assert M.masked_mean(x, torch.zeros(4)).item() == 0.0  # empty mask: 0, not NaN


def test_grpo_and_rloo_advantages_by_hand():
    scores = t(1.0, 2.0, 3.0, 5.0, 5.0, 5.0)
    # group 1: mean 2, unbiased std 1 -> -1, 0, 1; group 2 all equal -> 0 (no NaN)
    torch.testing.assert_close(M.group_advantages(scores, 3, "grpo", eps=0.0)[:3], t(-1.0, 0.0, 1.0))
    torch.testing.assert_close(M.group_advantages(scores, 3, "grpo")[3:], t(0.0, 0.0, 0.0))
    # rloo: 1 - mean(2, 3) = -1.5, 2 - mean(1, 3) = 0, 3 - mean(1, 2) = 1.5
    torch.testing.assert_close(M.group_advantages(scores, 3, "rloo"), t(-1.5, 0.0, 1.5, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="group_size"):
        M.group_advantages(scores, 1, "grpo")
    with pytest.raises(ValueError, match="groups of 4"):
        M.group_advantages(scores, 4, "rloo")


def test_dpo_loss_by_hand():
    # h = (-1 - -1.5) - (-2 - -1.5) = 1; beta 0.5 -> loss = -log sigmoid(0.5) = log(1 + e^-0.5)
    loss, stats = M.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert stats["chosen_reward"].item() == pytest.approx(0.25)
    assert stats["rejected_reward"].item() == pytest.approx(-0.25)
    assert stats["reward_accuracy"].item() == 1.0
    smooth, _ = M.dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)))


def test_adaptive_kl_controller_moves_toward_target_and_round_trips():
    c = M.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2 -> x(1 + 0.2 * 0.01)
    assert c.value == pytest.approx(0.1002)
    c.update(current_kl=5.4, n_steps=100)  # error -0.1 -> x(1 - 0.001)
    assert c.value == pytest.approx(0.1002 * 0.999)
    d = M.AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    fixed = M.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_logprobs_entropy_and_running_moments():
    logits = torch.log(t([0.5, 0.25, 0.25]))
    assert M.logprobs_from_logits(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.25))
    assert M.entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2.0))
    rm = M.RunningMoments()
    rm.update(t(1.0, 3.0))
    rm.update(t(5.0, 7.0))
    assert rm.mean == pytest.approx(4.0)
    assert rm.std == pytest.approx(math.sqrt(5.0))  # population variance of 1, 3, 5, 7


# --------------------------------------------------------------------------- passes, DAPO

def test_passes_with_the_minibatch_totals_add_up_to_the_minibatch_loss_by_hand():
    # three answers: [1, 2, 3], [4], [5, 6]; token sums 6, 4, 11; 6 tokens, 3 answers
    per_token = t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0])
    mask = t([1, 1, 1], [1, 0, 0], [1, 1, 0])
    totals = M.BatchTotals.of(mask)
    assert (totals.tokens, totals.answers) == (6.0, 3.0)
    whole = {  # token_mean 21/6; seq_mean_token_mean (2 + 4 + 5.5)/3; token sums (6 + 4 + 11)/3;
        # Dr.GRPO with a budget of 3: (2 + 4/3 + 11/3)/3
        "token_mean": 21 / 6, "seq_mean_token_mean": 11.5 / 3, "seq_mean_token_sum": 7.0,
        "seq_mean_token_sum_norm": 7.0 / 3}
    for mode, expected in whole.items():
        assert M.aggregate_loss(per_token, mask, mode, norm_len=3).item() == pytest.approx(expected)
        # pass 1 = answers 1 and 3, pass 2 = answer 2, each divided by the mini-batch's totals
        first = M.aggregate_loss(per_token[[0, 2]], mask[[0, 2]], mode, norm_len=3, totals=totals)
        second = M.aggregate_loss(per_token[[1]], mask[[1]], mode, norm_len=3, totals=totals)
        assert (first + second).item() == pytest.approx(expected), mode
    # token_mean shares: pass 1 holds 17 of the 21
    assert M.aggregate_loss(per_token[[0, 2]], mask[[0, 2]], totals=totals).item() == pytest.approx(17 / 6)
    assert M.mean_over(per_token[[1]], mask[[1]], totals).item() == pytest.approx(4 / 6)


def test_groups_with_signal_by_hand():
    # groups of 3: all equal -> no signal; one differs -> signal; the differing one unrewarded -> no
    # signal; a single rewarded answer -> no signal
    rewards = t(1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 5.0, 2.0, 9.0, 9.0)
    valid = t(1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0)
    assert M.groups_with_signal(rewards, valid, 3).tolist() == [False, True, False, False]


def test_overlong_penalty_and_truncation_by_hand():
    # budget 10, buffer 4: no penalty up to 6 tokens, then -(len - 6) / 4 * factor
    lengths = torch.tensor([3, 6, 7, 9, 10])
    torch.testing.assert_close(M.overlong_penalty(lengths, 10, 4, 1.0), torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]))
    torch.testing.assert_close(M.overlong_penalty(lengths, 10, 4, 0.5), torch.tensor([0.0, 0.0, -0.125, -0.375, -0.5]))
    # EOS = 2; 4 columns: an answer ending in EOS at the limit is complete, one without EOS is cut
    ids = torch.tensor([[5, 6, 7, 2], [5, 6, 7, 8], [5, 2, 0, 0]])
    mask = M.answer_mask(ids, 2)
    assert M.truncated_answers(mask, ids, 2, 4).tolist() == [False, True, False]
    # no EOS token at all: every answer runs to the limit
    assert M.truncated_answers(M.answer_mask(ids, None), ids, None, 4).tolist() == [True, True, True]
