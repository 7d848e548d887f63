"""The GRPO family's options: hand-computed math (expected numbers worked out in the comments),
then their wiring into the step-3 trainer on the bundled tiny Llama (CPU, fp32): no reference
model at kl_coef 0, old log-probs from the update's own forward (same result as two passes), the
rollout/trainer mismatch, and the critic-free commands."""
import dataclasses
import json
import math

import pytest
import torch

from fastrlhf.errors import ConfigError
from fastrlhf.options import config_from_dict
from fastrlhf.rlhf import rl_math as M
from fastrlhf.rlhf.algorithms import ALGORITHMS, AdvantageSettings, compute_advantages
from fastrlhf.rlhf.configs import PPOConfig
from conftest import tiny_ppo_setup

TIMING = {"gen_time", "forward_time", "train_time", "step_time", "tokens_per_s", "gen_tokens_per_s",
          "time_actor_forward", "time_ref_forward", "time_reward_forward", "time_critic_forward",
          "time_actor_train", "time_critic_train"}


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- math by hand

def test_loss_aggregations_by_hand():
    per_token = t([1.0, 2.0, 3.0], [4.0, 50.0, 50.0], [7.0, 7.0, 7.0])
    mask = t([1, 1, 1], [1, 0, 0], [0, 0, 0])  # row 3 has no token: left out of every mean
    # token_mean: (1 + 2 + 3 + 4) / 4
    assert M.aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(2.5)
    # seq_mean_token_mean: (6/3 + 4/1) / 2 answers
    assert M.aggregate_loss(per_token, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    # seq_mean_token_sum: (6 + 4) / 2
    assert M.aggregate_loss(per_token, mask, "seq_mean_token_sum").item() == pytest.approx(5.0)
    # Dr.GRPO: (6/4 + 4/4) / 2 with a generation budget of 4 tokens
    assert M.aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", norm_len=4).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="norm_len"):
        M.aggregate_loss(per_token, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        M.aggregate_loss(per_token, mask, "seq_sum")


def test_clip_higher_lets_the_ratio_rise_further_than_it_falls():
    # eps_low 0.2, eps_high 0.28 -> ratios clipped to [0.8, 1.28]
    # t0: A=1,  r=1.25: inside -> -1.25 (symmetric 0.2 would clip it to -1.2)
    # t1: A=1,  r=1.4:  max(-1.4, -1.28) = -1.28 (clipped)
    # t2: A=-1, r=0.7:  max(0.7, 0.8) = 0.8 (clipped)          mean = (-1.25 - 1.28 + 0.8) / 3
    logp = torch.log(t([1.25, 1.4, 0.7]))
    old, adv, mask = torch.zeros(3, dtype=torch.float64), t([1.0, 1.0, -1.0]), t([1, 1, 1])
    loss, st = M.clipped_policy_loss(logp, old, adv, mask, 0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.73 / 3)
    assert st["policy_clipfrac"].item() == pytest.approx(2 / 3)
    sym, _ = M.clipped_policy_loss(logp, old, adv, mask, 0.2)
    assert sym.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # c = 3, eps 0.2
    # t0: A=-1, r=5:   max(5, 1.2) = 5, capped at -c A = 3 (gradient 0)
    # t1: A=-2, r=1.1: 2.2 (inside the clip, below the cap 6: gradient -A r / 3 = 2.2 / 3)
    # t2: A=1,  r=5:   max(-5, -1.2) = -1.2 (positive advantage: no cap; clipped, gradient 0)
    logp = torch.log(t([5.0, 1.1, 5.0])).requires_grad_()
    adv, mask = t([-1.0, -2.0, 1.0]), t([1, 1, 1])
    loss, st = M.clipped_policy_loss(logp, torch.zeros(3, dtype=torch.float64), adv, mask, 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.2 - 1.2) / 3)
    assert st["policy_dualclip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([0.0, 2.2 / 3, 0.0]))
    plain, _ = M.clipped_policy_loss(logp.detach(), torch.zeros(3, dtype=torch.float64), adv, mask, 0.2)
    assert plain.item() == pytest.approx((5.0 + 2.2 - 1.2) / 3)


def test_gspo_sequence_ratio_value_and_gradient_by_hand():
    # row 1: token log-ratios ln 2, 0 -> s = exp((ln 2 + 0) / 2) = sqrt 2 on both tokens, A = 1
    # row 2: one real token, log-ratio ln 0.6 -> s = 0.6 (the junk after it is masked), A = -1
    # eps 0.5: clip range [0.5, 1.5], neither clipped; seq_mean_token_mean:
    #   loss = (-sqrt 2 + 0.6) / 2; d/dlogp_t = (1/2 rows) (1/|o|) (-A s):
    #   row 1 tokens -sqrt2 / 4 each, row 2 token 0.6 / 2, masked token 0
    old = torch.zeros(2, 2, dtype=torch.float64)
    logp = torch.log(t([2.0, 1.0], [0.6, 40.0])).requires_grad_()
    adv, mask = t([1.0, 1.0], [-1.0, -1.0]), t([1, 1], [1, 0])
    ratio = torch.exp(M.importance_log_ratio(logp, old, mask, "sequence"))
    torch.testing.assert_close(ratio.detach()[:, 0], t(math.sqrt(2), 0.6))
    loss, _ = M.clipped_policy_loss(logp, old, adv, mask, 0.5, importance_level="sequence",
                                    loss_agg="seq_mean_token_mean")
    assert loss.item() == pytest.approx((-math.sqrt(2) + 0.6) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([-math.sqrt(2) / 4, -math.sqrt(2) / 4], [0.3, 0.0]))
    # per token the first row's ratios are 2 and 1: a different loss
    token_loss, _ = M.clipped_policy_loss(logp.detach(), old, adv, mask, 0.5, loss_agg="seq_mean_token_mean")
    assert token_loss.item() == pytest.approx(((-1.5 - 1.0) / 2 + 0.6) / 2)


def test_truncated_importance_sampling_and_mismatch_by_hand():
    trainer, rollout = torch.log(t([1.0, 3.0, 0.5])), torch.zeros(3, dtype=torch.float64)
    w = M.truncated_is_weights(trainer, rollout, cap=2.0)  # ratios 1, 3, 0.5 -> 1, 2 (capped), 0.5
    torch.testing.assert_close(w, t([1.0, 2.0, 0.5]))
    # ratio 1 everywhere, A = 1: per-token loss -1, weighted -1, -2, -0.5
    logp = torch.zeros(3, dtype=torch.float64)
    loss, _ = M.clipped_policy_loss(logp, logp, t([1.0, 1.0, 1.0]), t([1, 1, 1]), 0.2, is_weights=w)
    assert loss.item() == pytest.approx(-3.5 / 3)
    # mismatch of trainer (0, ln 2) vs engine (0, 0): |delta| mean ln2 / 2; KL(engine || trainer) per token
    # with d = engine - trainer = -ln 2 on token 2: k3 = e^{ln 2} - 1 - ln 2 = 1 - ln 2
    mm = M.logprob_mismatch(t([0.0, math.log(2.0), 9.0]), t([0.0, 0.0, 0.0]), t([1, 1, 0]))
    assert mm["logprob_mismatch_abs"].item() == pytest.approx(math.log(2.0) / 2)
    assert mm["logprob_mismatch_kl"].item() == pytest.approx((1 - math.log(2.0)) / 2)


def test_dr_grpo_advantages_do_not_divide_by_the_group_std():
    scores = t(1.0, 3.0, 8.0)  # mean 4, unbiased std sqrt(13)
    torch.testing.assert_close(M.group_advantages(scores, 3, "grpo", std_norm=False), t(-3.0, -1.0, 4.0))
    torch.testing.assert_close(M.group_advantages(scores, 3, "grpo", eps=0.0), t(-3.0, -1.0, 4.0) / math.sqrt(13))


def test_reinforce_plus_plus_advantages_by_hand():
    torch.testing.assert_close(M.discounted_returns(t([0.0, 0.0, 1.0, 9.0]), t([1, 1, 1, 0]), 0.5),
                               t([0.25, 0.5, 1.0, 0.0]))
    # kl (k1) per token = logp - ref; kl_coef 0.1; scores 2, -1 on the last real token; gamma 1
    # row 1 rewards -0.05, 0, -0.1 + 2 -> returns 1.85, 1.9, 1.9
    # row 2 rewards -0.02, -0.04 - 1, (masked) -> returns -1.06, -1.04, 0
    logp, ref = t([0.5, 0.0, 1.0], [0.2, 0.4, 9.0]), torch.zeros(2, 3, dtype=torch.float64)
    mask, scores = t([1, 1, 1], [1, 1, 0]), t(2.0, -1.0)
    s = AdvantageSettings(algo="reinforce++", reward_clip=None, gamma=1.0, whiten_advantages=False)
    adv, returns, _ = compute_advantages(s, scores, mask, logp, ref, None, kl_coef=0.1)
    assert returns is None
    torch.testing.assert_close(adv, t([1.85, 1.9, 1.9], [-1.06, -1.04, 0.0]))
    whitened, _, _ = compute_advantages(dataclasses.replace(s, whiten_advantages=True), scores, mask, logp, ref,
                                        None, kl_coef=0.1)
    torch.testing.assert_close(whitened, M.masked_whiten(adv, mask))
    # baseline: the group (both answers) mean 0.5 is subtracted from the scores first: 1.5, -1.5
    s = dataclasses.replace(s, algo="reinforce++_baseline", group_size=2)
    adv, _, _ = compute_advantages(s, scores, mask, logp, ref, None, kl_coef=0.0)
    torch.testing.assert_close(adv, t([1.5, 1.5, 1.5], [-1.5, -1.5, 0.0]))


def test_every_record_of_the_algorithm_table_reaches_the_config_the_math_and_the_commands():
    from fastrlhf.rlhf.registry import TRAINERS
    scores, mask = torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.ones(4, 3)
    mask[1, 2] = 0
    for algo in ALGORITHMS.values():
        group = 2 if algo.grouped else 1
        cfg = PPOConfig(algo=algo.name, group_size=group, reward_fn=["fastrlhf.rewards:arithmetic_reward"])
        s = cfg.advantage_settings()
        assert (s.whiten_advantages, s.kl_in_reward) == (algo.whiten, algo.kl_in_reward), algo.name
        values = torch.zeros(4, 3) if algo.needs_critic else None
        adv, returns, _ = compute_advantages(s, scores, mask, None, None, values, kl_coef=0.0)
        assert adv.shape == (4, 3) and torch.isfinite(adv).all() and adv.abs().sum() > 0, algo.name
        assert (returns is not None) == algo.needs_critic, algo.name
        if algo.grouped:
            with pytest.raises(ConfigError, match="group_size >= 2"):
                config_from_dict(PPOConfig, {"algo": algo.name, "reward_fn": ["fastrlhf.rewards:arithmetic_reward"]})
        if algo.command is not None:
            assert TRAINERS[algo.name].preset == {"algo": algo.name, **algo.command}


def test_option_values_are_checked_with_clear_errors(tmp_path):
    base = dict(model_name_or_path="m", reward_model="r", output_dir=str(tmp_path))
    bad = [({"dual_clip": 0.5}, "dual_clip must be > 1"), ({"clip_eps_high": 0.0}, "clip_eps_high must be > 0"),
           ({"clip_eps_low": 1.0}, "clip_eps_low below 1"), ({"tis_cap": 0.5}, "tis_cap must be >= 1"),
           ({"entropy_coef": -0.1}, "entropy_coef must be >= 0"),
           ({"algo": "rloo", "group_size": 2, "group_std_norm": False}, "grpo only"),
           ({"algo": "reinforce++_baseline"}, "group_size >= 2"),
           ({"kl_coef": 0.0, "ref_model": "ref"}, "drop --ref_model"),
           ({"loss_agg": "sum"}, "seq_mean_token_mean")]
    for over, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(PPOConfig, {**base, **over})


# --------------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("grpo_models")
    _, items = tiny_ppo_setup(root, 24)
    return {"root": root, "train": items[:20], "eval": items[20:]}


def grpo_trainer(tiny, out, **over):
    from fastrlhf.rlhf.ppo import PPOTrainer
    kw = dict(model_name_or_path=str(tiny["root"] / "sft"), reward_model=str(tiny["root"] / "rm"),
              output_dir=str(out), algo="grpo", group_size=2, rollout_batch_size=2, micro_batch_size=4,
              max_steps=2, max_new_tokens=6, eval_prompts=2, learning_rate=1e-3, seed=7, save_steps=0)
    kw.update(over)
    return PPOTrainer(PPOConfig(**kw), prompts=tiny["train"], eval_prompts=tiny["eval"])


def count_forwards(model):
    """Calls of the model's token embedding: one per trainer forward, whether the log-probs come
    from the full HF forward or the fused op on the decoder body (the engine reads weights)."""
    calls = []
    model.get_input_embeddings().register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_kl_coef_zero_loads_and_runs_no_reference_model(tiny, tmp_path):
    import fastrlhf.rlhf.ppo_models as pm
    loaded = []
    real = pm.load_causal_lm
    pm.load_causal_lm = lambda *a, **k: loaded.append(a) or real(*a, **k)
    try:
        tr = grpo_trainer(tiny, tmp_path / "noref", kl_coef=0.0)
    finally:
        pm.load_causal_lm = real
    assert tr.ref is None and len(loaded) == 1  # the actor only
    m = tr.train_step()
    assert "time_ref_forward" not in m and "kl" not in m and "kl_loss" not in m
    assert m["skipped_updates"] == 0 and math.isfinite(m["policy_loss"])
    ev = tr.evaluate()
    assert "kl_to_ref" not in ev and math.isfinite(ev["reward"])
    assert "KL" not in tr.format_eval(ev, ev)


def test_the_update_returns_the_rollout_logprobs_it_computed_and_leaves_the_experience_alone(tiny, tmp_path):
    from fastrlhf.rlhf.experience import answer_logprobs
    tr = grpo_trainer(tiny, tmp_path / "u")
    assert tr.old_logprobs_from_update
    exp = tr.rollouts.make(tr.prompts[:2], tr.kl_ctl.value, old_logprobs=False)
    assert exp.old_logprobs is None
    with torch.no_grad():  # the policy before its one optimizer step: what the update's forward sees
        expected = answer_logprobs(tr.actor, exp.sequences, exp.attention_mask, exp.prompt_len)
    result = tr.update(exp)
    assert exp.old_logprobs is None and result.metrics["skipped_updates"] == 0
    torch.testing.assert_close(result.old_logprobs, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("accumulate", [False, True], ids=["one_minibatch", "accumulated_minibatches"])
def test_old_logprobs_from_the_update_forward_give_the_two_pass_result(tiny, tmp_path, accumulate):
    """One optimizer step per rollout: the fused path skips the rollout-time actor forward and
    ends with the same metrics and weights as the two-pass path (fp32, same seed)."""
    over = dict(micro_batch_size=2, global_batch_size=4) if accumulate else {}
    fused, two = (grpo_trainer(tiny, tmp_path / name, entropy_coef=0.01, **over) for name in ("fused", "two"))
    assert fused.old_logprobs_from_update
    two.old_logprobs_from_update = False
    calls = {name: count_forwards(tr.actor.module) for name, tr in (("fused", fused), ("two", two))}
    start = [p.detach().clone() for p in fused.actor.module.parameters()]
    for _ in range(2):
        a, b = fused.train_step(), two.train_step()
        assert "time_actor_forward" not in a and "time_actor_forward" in b
        assert set(a) - TIMING == set(b) - TIMING
        for k in set(a) - TIMING:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    n_mb = 2 if accumulate else 1
    assert len(calls["fused"]) == 2 * n_mb and len(calls["two"]) == 2 * (n_mb + 1)
    moved = 0.0
    for (n, p), q, p0 in zip(fused.actor.module.named_parameters(), two.actor.module.parameters(), start):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-4  # the two steps trained: the agreement is not that of untouched weights


def test_mismatch_entropy_and_options_reach_the_loss(tiny, tmp_path, monkeypatch):
    seen = {}
    real_loss, real_agg = M.clipped_policy_loss, M.aggregate_loss

    def spy_loss(*a, **k):
        seen["loss"] = (a, k)
        return real_loss(*a, **k)

    def spy_agg(x, mask, mode="token_mean", norm_len=None, totals=None):
        seen.setdefault("agg", []).append((mode, norm_len))
        return real_agg(x, mask, mode, norm_len, totals)
    monkeypatch.setattr(M, "clipped_policy_loss", spy_loss)
    monkeypatch.setattr(M, "aggregate_loss", spy_agg)
    tr = grpo_trainer(tiny, tmp_path / "opts", clip_eps_low=0.1, clip_eps_high=0.3, dual_clip=3.0,
                      importance_level="sequence", loss_agg="seq_mean_token_sum_norm", tis_cap=2.0,
                      entropy_coef=0.01, group_std_norm=False, ppo_epochs=2)
    m = tr.train_step()
    a, k = seen["loss"]
    assert a[4] == 0.1 and k["clip_eps_high"] == 0.3 and k["dual_clip"] == 3.0
    assert k["importance_level"] == "sequence" and k["loss_agg"] == "seq_mean_token_sum_norm" and k["norm_len"] == 6
    assert k["is_weights"] is not None
    # the policy loss, the entropy bonus and the GRPO KL loss, each aggregated the same way, in each of
    # the 2 epochs of one mini-batch
    assert seen["agg"] == [("seq_mean_token_sum_norm", 6)] * 6
    assert tr.cfg.advantage_settings().group_std_norm is False
    # the engine's and the trainer's log-probs agree closely in fp32 on the CPU, logged every step
    for key in ("logprob_mismatch_abs", "logprob_mismatch_kl", "entropy", "tis_weight", "policy_dualclip_frac"):
        assert key in m and math.isfinite(m[key]), key
    assert 0 <= m["logprob_mismatch_abs"] < 1e-3 and 0 <= m["logprob_mismatch_kl"] < 1e-3
    assert m["tis_weight"] == pytest.approx(1.0, abs=1e-3) and m["entropy"] > 0


@pytest.mark.parametrize("algo,group", [("reinforce++", 1), ("reinforce++_baseline", 2)])
def test_reinforce_plus_plus_trains_without_a_critic(tiny, tmp_path, algo, group):
    tr = grpo_trainer(tiny, tmp_path / algo, algo=algo, group_size=group, rollout_batch_size=4 // group)
    assert tr.critic is None and not tr.old_logprobs_from_update  # its KL penalty is in the reward
    m = tr.train_step()
    assert m["skipped_updates"] == 0 and math.isfinite(m["policy_loss"]) and "kl" in m and "return" not in m


def test_critic_free_commands_are_ppo_with_the_algo_set(monkeypatch, tmp_path):
    from fastrlhf import cli
    from fastrlhf.rlhf import registry
    got = []
    for name in ("grpo", "reinforce++"):
        monkeypatch.setitem(registry.TRAINERS, name, dataclasses.replace(
            registry.TRAINERS[name], train=lambda cfg: got.append(cfg) or {}, summary=lambda r: "ok"))
    common = ["--model_name_or_path", "m", "--reward_model", "r", "--output_dir", str(tmp_path)]
    assert cli.main(["grpo", *common]) == 0
    assert cli.main(["grpo", *common, "--group_size", "8", "--loss_agg", "seq_mean_token_mean"]) == 0
    assert cli.main(["reinforce++", *common]) == 0
    assert [(c.algo, c.group_size) for c in got] == [("grpo", 4), ("grpo", 8), ("reinforce++", 1)]
    assert got[1].loss_agg == "seq_mean_token_mean"
    with pytest.raises(SystemExit):
        cli.main(["grpo", *common, "--algo", "ppo"])
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"algo": "rloo"}))
    with pytest.raises(SystemExit):
        cli.main(["grpo", *common, "--config", str(cfg_file)])
