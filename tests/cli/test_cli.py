import os
import subprocess
import sys

import pytest

from fastrlhf import cli


def _train_args(argv):
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(["train"] + argv)
    return args, extra


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "sft", "rm", "ppo", "ops"):
        assert command in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--steps" in out and "--data.max_prompt_len" in out and "--sft.KEY" in out and "examples:" in out


@pytest.mark.parametrize("command, option", [("ppo", "--reward_model"), ("dpo", "--beta"), ("rm", "--learning_rate")])
def test_each_trainer_command_lists_its_own_options(command, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert option in out and "--save_total_limit" in out and "--resume" in out


def test_console_script_help_runs_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "fastrlhf.cli", "sft", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--learning_rate" in proc.stdout and "--lora_rank" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--zero_stage", "9"], "zero_stage=9 is not allowed"),
    (["train", "--sft.learnin_rate", "1"], "did you mean learning_rate"),
    (["train", "--bogus", "1"], "unknown option --bogus"),
    (["sft", "--micro_batch_size", "many"], "micro_batch_size='many' is not a valid int"),
    (["rm", "--not_an_option", "1"], "unknown option --not_an_option"),
    (["train", "--config", "/no/such/file.yaml"], "does not exist"),
])
def test_bad_arguments_give_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_train_wires_each_step_into_the_next(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: 7\nzero_stage: 1\nsft:\n  num_epochs: 3\nrm:\n  learning_rate: 2.0e-3\n")
    args, extra = _train_args(["--steps", "1", "2", "--config", str(f), "--output_dir", str(tmp_path / "o"),
                               "--rm.max_steps", "5", "--sft.data.max_samples", "50", "--rm_init", "sft"])
    configs = cli.build_step_configs(args, extra)
    sft, rm = configs[1], configs[2]
    assert sft.output_dir == str(tmp_path / "o" / "step1_sft") and rm.output_dir == str(tmp_path / "o" / "step2_rm")
    assert sft.seed == rm.seed == 7 and sft.zero_stage == rm.zero_stage == 1
    assert sft.num_epochs == 3 and sft.data.max_samples == 50 and rm.data.max_samples is None
    assert rm.learning_rate == pytest.approx(2e-3) and rm.max_steps == 5
    assert rm.model_name_or_path == sft.output_dir  # --rm_init sft
    # bundled default: the tuned profile applies under the file and the command line
    from fastrlhf.tasks import default_task
    assert sft.learning_rate == pytest.approx(default_task.PROFILES["sft"]["learning_rate"])


def test_rm_starts_from_the_base_model_by_default_and_profiles_stay_off_for_real_models(tmp_path):
    args, extra = _train_args(["--steps", "1", "2", "--model_name_or_path", "some/model"])
    configs = cli.build_step_configs(args, extra)
    assert configs[2].model_name_or_path == "some/model"
    assert configs[1].learning_rate == pytest.approx(1e-5)  # the class default, not the tiny-task profile


def test_step3_gets_the_sft_and_reward_model_dirs(tmp_path):
    args, extra = _train_args(["--steps", "1", "2", "3", "--output_dir", str(tmp_path), "--ppo.max_steps", "2"])
    configs = cli.build_step_configs(args, extra)
    assert configs[3].model_name_or_path == os.path.join(str(tmp_path), "step1_sft")
    assert configs[3].reward_model == os.path.join(str(tmp_path), "step2_rm")
    assert configs[3].max_steps == 2 and configs[1].max_steps is None


def test_ops_command_reports_backends(capsys):
    assert cli.main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "available" in out
    assert "cuda hands attention_prefill calls with softcap / window / alibi_slopes / cu_seqlens to triton" in out


def test_train_steps_1_2_on_the_bundled_default_end_to_end(tmp_path, capsys):
    """The real path: bundled tokenizer/config/data, fastrlhf.data splits and collators, both trainers."""
    out = tmp_path / "run"
    rc = cli.main(["train", "--steps", "1", "2", "--output_dir", str(out), "--data.max_samples", "64",
                   "--max_steps", "2", "--micro_batch_size", "8", "--eval_max_batches", "1", "--data.cache_dir",
                   str(tmp_path / "cache")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "[step 1 SFT] eval before training" in text and "[step 1 SFT] eval after training" in text
    assert "[step 2 RM] eval after training:  accuracy" in text
    from fastrlhf.models.loading import load_causal_lm
    from fastrlhf.models.reward import RewardModel
    assert load_causal_lm(str(out / "step1_sft")).config.model_type == "llama"
    assert RewardModel.is_reward_model_dir(str(out / "step2_rm"))
    RewardModel.from_pretrained(str(out / "step2_rm"))


def test_deepspeed_launcher_local_rank_flag_is_accepted(tmp_path):
    args, extra = _train_args(["--local_rank=1", "--steps", "1", "--output_dir", str(tmp_path)])
    assert extra == [] and args.local_rank == 1
    assert cli.build_step_configs(args, extra)[1].output_dir == str(tmp_path / "step1_sft")


def test_only_rank0_writes_logs(tmp_path, monkeypatch):
    from fastrlhf.utils import logging as fl_logging
    monkeypatch.setattr(fl_logging, "is_rank0", lambda: False)
    logger = fl_logging.MetricsLogger(str(tmp_path / "tb_rank1"))
    logger.log({"train/loss": 1.0}, 1)
    logger.close()
    assert not (tmp_path / "tb_rank1").exists()
    monkeypatch.setattr(fl_logging, "is_rank0", lambda: True)
    logger = fl_logging.MetricsLogger(str(tmp_path / "tb_rank0"))
    logger.log({"train/loss": 1.5}, 3)
    logger.close()
    assert (tmp_path / "tb_rank0" / "metrics.jsonl").read_text().strip() == '{"step": 3, "train/loss": 1.5}'
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb_rank0").iterdir())


def test_bundled_ppo_profile_trains_all_its_max_steps(tmp_path):
    """max_steps caps num_epochs: the profile must hold enough passes over the prompts."""
    from fastrlhf.data import build_datasets
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.batches import total_train_steps
    args, extra = _train_args(["--steps", "3", "--output_dir", str(tmp_path)])
    ppo = cli.build_step_configs(args, extra)[3]
    prompts, _ = build_datasets(ppo.data, load_tokenizer(None), 3)
    assert total_train_steps(ppo, len(prompts) // ppo.rollout_batch_size) == ppo.max_steps
