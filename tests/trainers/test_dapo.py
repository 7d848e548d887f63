"""DAPO's dynamic sampling and overlong shaping, and --old_logprobs engine, in the step-3 trainer
on the bundled tiny Llama (CPU, fp32) with a reward function that gives groups with and without a
learning signal: the rounds by hand with a stand-in sampler, the metrics, an exactly resumable
data order, masks and penalties where the math says, and every bad option refused."""
import math
import os

import pytest
import torch

from fastrlhf.errors import ConfigError
from fastrlhf.options import config_from_dict
from fastrlhf.rlhf import rl_math as M
from fastrlhf.rlhf.configs import PPOConfig
from fastrlhf.rlhf.dynamic_sampling import sample_informative_groups
from fastrlhf.rlhf.experience import Rollout, ScoredRollout
from conftest import tiny_ppo_setup

REWARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dapo_rewards.py") + ":thirds"
TIMING = {"gen_time", "forward_time", "train_time", "step_time", "tokens_per_s", "gen_tokens_per_s",
          "time_actor_forward", "time_ref_forward", "time_reward_forward", "time_critic_forward",
          "time_actor_train", "time_critic_train"}


# --------------------------------------------------------------------------- rounds by hand

class StandInMaker:
    """`sample` returns prepared rounds (2 prompts x 2 answers each) in order, counting calls."""
    class Tok:
        pad_token_id = 0

    def __init__(self, rounds):
        self.rounds, self.calls, self.tokenizer = list(rounds), 0, self.Tok()

    def sample(self, items):
        self.calls += 1
        return self.rounds.pop(0)


def scored_round(rewards, prompt_len, answer_len, tag):
    """A scored rollout of len(rewards) answers: prompts of `prompt_len` tokens (value tag), answers
    of `answer_len` columns (value tag + 1)."""
    b = len(rewards)
    seqs = torch.cat([torch.full((b, prompt_len), tag), torch.full((b, answer_len), tag + 1)], 1)
    ones = torch.ones(b, prompt_len + answer_len, dtype=torch.long)
    batch = {"input_ids": seqs[:, :prompt_len], "attention_mask": ones[:, :prompt_len], "prompt": [str(tag)] * b,
             "columns": {"answer": [tag] * b}}
    rollout = Rollout(seqs, ones, torch.ones(b, answer_len), prompt_len, torch.full((b, answer_len), -float(tag)))
    return ScoredRollout(batch, rollout, torch.tensor(rewards), torch.ones(b), None, torch.zeros(b, dtype=torch.bool),
                         None, {"gen_time": 1.0, "time_reward_forward": 0.5})


def test_dynamic_sampling_rounds_by_hand():
    cfg = PPOConfig(algo="grpo", group_size=2, rollout_batch_size=2, dynamic_sampling=True, max_sampling_rounds=3,
                    reward_clip=0.0)
    # round 1: group 0 equal (dropped), group 1 has a signal; round 2: group 0 has one, group 1 not
    rounds = [scored_round([1.0, 1.0, 0.0, 1.0], 3, 2, 10), scored_round([0.0, 2.0, 5.0, 5.0], 4, 3, 20),
              scored_round([0.0, 1.0, 0.0, 1.0], 2, 2, 30)]
    maker = StandInMaker(rounds)
    out, stats = sample_informative_groups(maker, lambda: [], cfg)
    assert maker.calls == 2  # full after two rounds: the third is never sampled
    assert stats == {"sampling_rounds": 2.0, "prompts_consumed": 4.0, "groups_dropped": 2.0, "groups_short": 0.0,
                     "sampled_reward_mean": pytest.approx(15 / 8)}
    assert out.scores.tolist() == [0.0, 1.0, 0.0, 2.0] and out.sample_mask.tolist() == [1, 1, 1, 1]
    # round 1's answers re-padded to round 2's prompt (4) and answer (3) widths; the engine's
    # log-probs and the columns follow their rows
    r = out.rollout
    assert r.prompt_len == 4 and r.sequences.shape == (4, 7)
    assert r.sequences[0].tolist() == [0, 10, 10, 10, 11, 11, 0] and r.sequences[2].tolist() == [20] * 4 + [21] * 3
    assert r.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 1, 0] and r.action_mask[0].tolist() == [1, 1, 0]
    assert r.engine_logprobs[:, 0].tolist() == [-10, -10, -20, -20]
    assert out.batch["input_ids"].shape == (4, 4) and out.batch["columns"]["answer"] == [10, 10, 20, 20]
    assert out.times == {"gen_time": 2.0, "time_reward_forward": 1.0}


def test_dynamic_sampling_at_the_cap_trains_on_what_it_kept():
    cfg = PPOConfig(algo="grpo", group_size=2, rollout_batch_size=2, dynamic_sampling=True, max_sampling_rounds=2,
                    reward_clip=0.5, overlong_buffer_len=None)
    # reward_clip 0.5 makes 3.0 and 7.0 equal: only round 2's group 1 has a signal
    rounds = [scored_round([3.0, 7.0, 1.0, 1.0], 2, 2, 10), scored_round([0.0, 0.0, 0.0, 0.2], 2, 2, 20)]
    out, stats = sample_informative_groups(StandInMaker(rounds), lambda: [], cfg)
    assert stats["sampling_rounds"] == 2 and stats["groups_short"] == 1 and stats["groups_dropped"] == 3
    # the kept group and the first dropped one as a filler, out of the loss (rows in round order)
    torch.testing.assert_close(out.scores, torch.tensor([3.0, 7.0, 0.0, 0.2]))
    assert out.sample_mask.tolist() == [0, 0, 1, 1]


# --------------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dapo_models")
    _, items = tiny_ppo_setup(root, 28)
    return {"root": root, "train": items[:24], "eval": items[24:]}


def trainer(tiny, out, **over):
    from fastrlhf.rlhf.ppo import PPOTrainer
    kw = dict(model_name_or_path=str(tiny["root"] / "sft"), reward_fn=[REWARD], output_dir=str(out), algo="grpo",
              group_size=2, rollout_batch_size=2, micro_batch_size=4, max_steps=3, max_new_tokens=6, eval_prompts=2,
              learning_rate=1e-3, seed=7, save_steps=0, reward_clip=0.0)
    kw.update(over)
    return PPOTrainer(PPOConfig(**kw), prompts=tiny["train"], eval_prompts=tiny["eval"])


def test_dynamic_sampling_logs_its_rounds_and_a_resumed_run_consumes_the_same_prompts(tiny, tmp_path):
    kw = dict(dynamic_sampling=True, max_sampling_rounds=4)
    full = trainer(tiny, tmp_path / "full", **kw)
    full.train()
    rounds = [h["sampling_rounds"] for h in full.history]
    assert sum(rounds) > len(rounds)  # groups were dropped and more prompts sampled
    for h in full.history:
        assert h["prompts_consumed"] == 2 * h["sampling_rounds"]
        # a round is sampled only while fewer than 2 groups were kept: at least 2k - 1 dropped in k
        # rounds before the last; the last may keep more than needed (the extras are not trained on)
        n = h["sampling_rounds"]
        assert 2 * (n - 1) - 1 <= h["groups_dropped"] <= 2 * n - 2 + h["groups_short"]
    # the sampler moved past every consumed prompt: 2 prompts per round
    assert full.sampler.state_dict()["micro_in_epoch"] + 12 * full.sampler.state_dict()["epoch"] == sum(rounds)
    part = trainer(tiny, tmp_path / "part", save_steps=2, **kw)
    part.total_steps = 2  # as if killed right after the checkpoint of step 2
    part.train()
    resumed = trainer(tiny, tmp_path / "part", save_steps=2, **kw)
    assert resumed.maybe_resume() is not None and resumed.step == 2
    resumed.train()
    for k in full.history[2]:
        if k not in TIMING:
            assert resumed.history[2][k] == full.history[2][k], k


def test_truncated_answers_leave_the_loss_and_the_overlong_penalty_reaches_the_advantages(tiny, tmp_path):
    t = trainer(tiny, tmp_path / "overlong", mask_truncated=True, overlong_buffer_len=4, overlong_penalty_factor=0.5,
                kl_coef=0.0)
    scored = t.rollouts.sample(t.prompts[:2])
    assert bool(scored.truncated.all())  # the random tiny model does not stop within 6 tokens
    # answers 0 and 2 made to end with EOS after 3 tokens (the first answer of each group)
    r, eos, P = scored.rollout, t.tokenizer.eos_token_id, scored.rollout.prompt_len
    for row in (0, 2):
        r.sequences[row, P + 2], r.sequences[row, P + 3:] = eos, t.tokenizer.pad_token_id
        r.action_mask[row, 3:], r.attention_mask[row, P + 3:] = 0, 0
    lengths = r.action_mask.sum(1)
    scored.truncated = M.truncated_answers(r.action_mask, r.sequences[:, P:], eos, 6)
    scored.penalty = M.overlong_penalty(lengths, 6, 4, 0.5)
    assert scored.truncated.tolist() == [False, True, False, True]
    exp = t.rollouts.experience(scored, 0.0)
    assert exp.action_mask[[1, 3]].sum() == 0 and exp.action_mask[[0, 2]].sum() == 6
    assert exp.info["truncated"] == 2.0
    # budget 6, buffer 4, factor 0.5: 3 tokens -> -0.5 * 1 / 4, 6 tokens -> -0.5
    assert scored.penalty.tolist() == [-0.125, -0.5, -0.125, -0.5]
    assert exp.info["overlong_penalty"] == pytest.approx(-0.3125)
    # the cut answers' rewards (penalty included) still set their group's baseline
    expected = M.group_advantages(scored.scores + scored.penalty, 2, "grpo")[:, None] * exp.action_mask
    assert expected[[0, 2], :3].abs().min() > 0.1
    torch.testing.assert_close(exp.advantages, expected)


def test_engine_logprobs_replace_the_trainer_forward_and_the_mismatch_is_still_measured(tiny, tmp_path):
    t = trainer(tiny, tmp_path / "engine", old_logprobs="engine", micro_batch_size=2, ppo_epochs=2)
    scored = t.rollouts.sample(t.prompts[:2])
    exp = t.rollouts.experience(scored, t.kl_ctl.value)
    assert exp.old_logprobs is scored.rollout.engine_logprobs and "time_actor_forward" not in exp.info
    result = t.update(exp)
    # the update's first mini-batch (2 of the 4 answers) ran before any optimizer step: its
    # forward is the rollout policy's, the rest are not known
    assert int(result.fresh_rows.sum()) == 2
    m = t.train_step()
    for key in ("logprob_mismatch_abs", "logprob_mismatch_kl", "kl"):
        assert key in m and math.isfinite(m[key]), key
    assert m["logprob_mismatch_abs"] < 1e-3 and m["skipped_updates"] == 0


def test_dapo_and_packing_options_are_checked_with_clear_errors(tmp_path):
    base = dict(model_name_or_path="m", reward_model="r", output_dir=str(tmp_path), algo="grpo", group_size=2,
                max_new_tokens=8)
    bad = [({"dynamic_sampling": True, "max_sampling_rounds": 0}, "max_sampling_rounds must be >= 1"),
           ({"max_sampling_rounds": 3}, "add --dynamic_sampling"),
           ({"dynamic_sampling": True, "algo": "ppo", "group_size": 1}, "does not group answers"),
           ({"mask_truncated": True, "max_new_tokens": None}, "set --max_new_tokens"),
           ({"overlong_buffer_len": 4, "max_new_tokens": None}, "set --max_new_tokens"),
           ({"overlong_buffer_len": 8}, "must be below --max_new_tokens 8"),
           ({"overlong_buffer_len": 0}, "overlong_buffer_len must be >= 1"),
           ({"overlong_penalty_factor": 2.0}, "set --overlong_buffer_len"),
           ({"old_logprobs": "engine", "tis_cap": 2.0}, "drop one of them"),
           ({"old_logprobs": "engine", "importance_level": "sequence"}, "GSPO clips"),
           ({"old_logprobs": "vllm"}, "old_logprobs"),
           ({"max_tokens_per_micro_batch": 64}, "add --packing"),
           ({"packing": True, "max_tokens_per_micro_batch": 0}, "max_tokens_per_micro_batch must be >= 1")]
    for over, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(PPOConfig, {**base, **over})
    # what is allowed: engine log-probs over several epochs (see the README for why)
    config_from_dict(PPOConfig, {**base, "old_logprobs": "engine", "ppo_epochs": 4})
