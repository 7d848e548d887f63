"""Rewards that carry no signal, or one too large to train on, are caught with a message naming
the source and the option to change."""
import os

import pytest

from conftest import run_cli
from fastrlhf.errors import ConfigError, RewardError
from fastrlhf.rewards.sources import check_rewards

FNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fns.py")
PPO_TINY = ["--data.max_samples", "32", "--rollout_batch_size", "4", "--micro_batch_size", "4", "--ppo_epochs", "1",
            "--eval_prompts", "4", "--max_new_tokens", "4", "--save_steps", "0", "--log_steps", "1"]


def run(argv, capsys, monkeypatch):
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")
    return run_cli(argv, capsys)


def test_reward_weights_that_are_all_zero_are_refused(tmp_path):
    from fastrlhf.rlhf.configs import PPOConfig
    with pytest.raises(ConfigError, match=r"--reward_weights are all 0 \(0 0\)"):
        PPOConfig(reward_fn=["fastrlhf.rewards:format_reward"], reward_url=["http://127.0.0.1:1/r"],
                  reward_weights=[0, 0], output_dir=str(tmp_path)).validate()
    PPOConfig(reward_fn=["fastrlhf.rewards:format_reward"], reward_url=["http://127.0.0.1:1/r"],
              reward_weights=[0, 1], output_dir=str(tmp_path)).validate()  # a source switched off is fine


def test_rewards_beyond_float32_are_refused_naming_the_function():
    with pytest.raises(RewardError, match=r"reward function big returned 1e\+39 as reward 1 .*beyond float32"):
        check_rewards("big", [1.0, 1e39], 2, ["p", "q"])
    with pytest.raises(RewardError, match=r"reward server http://h/r returned -1e\+40 as reward 0"):
        check_rewards("http://h/r", [-1e40], 1, ["p"])
    assert check_rewards("ok", [3e38, None], 2) == [3e38, None]


def test_divergence_after_huge_rewards_names_the_reward_scale(tmp_path, capsys, monkeypatch):
    rc, _, err = run(["ppo", "--reward_fn", f"{FNS}:huge", "--reward_clip", "0", *PPO_TINY, "--max_steps", "6",
                      "--output_dir", str(tmp_path / "o")], capsys, monkeypatch)
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert "stopped: 3 consecutive PPO steps had NaN/inf" in line, line
    assert "the rewards reached |reward| 2e+30" in line and "--reward_clip 0 (off)" in line, line
    assert line.index("--reward_clip") < line.index("--learning_rate"), line


def test_rewards_that_are_all_none_are_said_and_stop_the_run_naming_the_source(tmp_path, capsys, monkeypatch):
    """Every sample unrewarded (a null answer column, a server answering nulls): each such step is
    warned about, a few in a row stop the run naming the source, and the held-out reward that was
    never computed reads "no reward", not 0.000."""
    rc, out, err = run(["ppo", "--algo", "grpo", "--group_size", "2", "--reward_fn", f"{FNS}:none_for_all",
                        *PPO_TINY, "--max_steps", "10", "--output_dir", str(tmp_path / "o")], capsys, monkeypatch)
    assert rc == 2, err[-2000:]
    assert "eval before training: reward no reward" in out, out[-3000:]
    warned = [line for line in out.splitlines() if "none of the 8 answers got a reward" in line]
    assert len(warned) == 2 and "none_for_all returned None for every one" in warned[0], out[-3000:]
    line = err.strip().splitlines()[-1]
    assert "3 consecutive steps had no rewarded answer" in line and "none_for_all returned None for all" in line, line
    assert "reward 0.0" not in out and "reward nan" not in out


def test_the_summary_says_no_reward_for_a_reward_never_computed():
    from fastrlhf.rlhf.registry import TRAINERS

    class Run:
        cfg = type("C", (), {"algo": "grpo"})()
    nan = float("nan")
    line = TRAINERS["ppo"].summary({"eval_before": {"reward": nan}, "eval_after": {"reward": 0.5}, "trainer": Run()})
    assert line == "step 3 GRPO: held-out reward no reward -> 0.500"
