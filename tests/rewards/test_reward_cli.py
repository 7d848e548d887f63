"""The reward options on the command line: repeatable flags, the arithmetic task's wiring, help,
and a bad --reward_fn refused before any model loads. Config-level only (no training)."""
import argparse
import os

import pytest

from fastrlhf.cli import build_parser, build_step_configs, main

FNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fns.py")


def step_configs(argv):
    args, extra = build_parser().parse_known_args(["train"] + argv)
    return build_step_configs(args, extra)


def test_arithmetic_task_runs_sft_then_grpo_on_a_reward_function_without_a_reward_model(tmp_path):
    from fastrlhf.tasks.arithmetic_task import arithmetic_data_path, arithmetic_model_dir
    cfgs = step_configs(["--task", "arithmetic", "--output_dir", str(tmp_path), "--ppo.max_steps", "7"])
    assert sorted(cfgs) == [1, 3]
    sft, grpo = cfgs[1], cfgs[3]
    assert sft.model_name_or_path == arithmetic_model_dir() and sft.data.paths == [arithmetic_data_path()]
    assert grpo.model_name_or_path == str(tmp_path / "step1_sft") and grpo.reward_model is None
    assert grpo.algo == "grpo" and grpo.reward_fn == ["fastrlhf.rewards:arithmetic_reward"] and grpo.max_steps == 7
    with pytest.raises(SystemExit):
        main(["train", "--task", "arithmetic", "--steps", "2", "--output_dir", str(tmp_path)])


def test_reward_flags_repeat_and_drop_the_reward_model_when_step_2_does_not_run(tmp_path):
    cfgs = step_configs(["--steps", "1", "3", "--output_dir", str(tmp_path), "--ppo.algo", "grpo",
                         "--ppo.group_size", "2", "--ppo.reward_fn", "fastrlhf.rewards:format_reward",
                         "--ppo.reward_fn", f"{FNS}:none_for_all", "--ppo.reward_weights", "1", "0.5"])
    assert cfgs[3].reward_fn == ["fastrlhf.rewards:format_reward", f"{FNS}:none_for_all"]
    assert cfgs[3].reward_weights == [1.0, 0.5] and cfgs[3].reward_model is None
    # with step 2 in the same command its model is a source too (first in the weights)
    cfgs = step_configs(["--output_dir", str(tmp_path), "--ppo.reward_fn", "fastrlhf.rewards:format_reward",
                         "--ppo.reward_weights", "1", "0.5"])
    assert cfgs[3].reward_model == str(tmp_path / "step2_rm")
    # `fastrlhf ppo`: the flag repeats too
    from fastrlhf.options import namespace_overrides
    from fastrlhf.rlhf.configs import PPOConfig
    ns, _ = build_parser().parse_known_args(["ppo", "--reward_fn", "a:b", "--reward_fn", "c.py:d"])
    assert namespace_overrides(ns, PPOConfig)["reward_fn"] == ["a:b", "c.py:d"]


def test_help_lists_the_reward_options_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--reward_fn", "--reward_url", "--reward_weights", "--reward_timeout", "fastrlhf ppo --algo grpo"):
        assert flag in out, flag


def test_a_missing_reward_function_is_a_one_line_error_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import fastrlhf.models.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(loading, "load_causal_lm", no_loading)
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--algo", "grpo", "--group_size", "2", "--reward_fn", f"{FNS}:no_such_fn",
              "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no function 'no_such_fn'" in err
