import json

import pytest

from fastrlhf.config import TrainConfig
from fastrlhf.errors import ConfigError
from fastrlhf.options import config_from_dict, load_config_file, parse_config, update_config
from fastrlhf.rlhf.configs import RMConfig, SFTConfig
from fastrlhf.rlhf.ds_engine import batch_geometry, build_ds_config


def test_yaml_file_then_command_line_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("learning_rate: 2.0e-4\nzero_stage: 2\ndata:\n  max_prompt_len: 40\n  paths: [a.json, b.json]\n"
                 "lora_target_modules: [q_proj]\n")
    cfg = parse_config(SFTConfig, ["--config", str(f), "--zero_stage", "3", "--data.max_answer_len", "17",
                                   "--gradient_checkpointing", "--lora_target_modules", "q_proj", "v_proj"])
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert cfg.zero_stage == 3  # command line wins over the file
    assert cfg.data.max_prompt_len == 40 and cfg.data.max_answer_len == 17
    assert cfg.data.paths == ["a.json", "b.json"]
    assert cfg.gradient_checkpointing is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.output_dir == "output/step1_sft"  # the step's own default


def test_json_file_and_explicit_false(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"max_steps": 7, "merge_lora_on_save": True, "data": {"train_on_prompt": True}}))
    cfg = parse_config(RMConfig, ["--config", str(f), "--merge_lora_on_save", "false", "--max_steps", "1e1"])
    assert cfg.max_steps == 10 and cfg.merge_lora_on_save is False and cfg.data.train_on_prompt is True


@pytest.mark.parametrize("values, message", [
    ({"learning_rat": 1.0}, "did you mean learning_rate"),
    ({"data": {"max_promt_len": 3}}, "data.max_promt_len"),
    ({"zero_stage": 4}, "zero_stage=4 is not allowed"),
    ({"dtype": "fp8"}, "choose one of fp32, bf16, fp16"),
    ({"micro_batch_size": "two"}, "micro_batch_size='two' is not a valid int"),
    ({"num_epochs": 2.5}, "num_epochs=2.5 is not a valid int"),
    ({"gradient_checkpointing": "maybe"}, "not a valid bool"),
    ({"offload": "cpu"}, "offload=cpu needs ZeRO"),
    ({"data": 5}, "data must be a mapping"),
    ({"resume": "/no/such/dir"}, "neither 'auto', 'no' nor an existing checkpoint dir"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(SFTConfig, values)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_config_file(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(str(listy))


def test_update_config_keeps_other_values():
    cfg = config_from_dict(SFTConfig, {"seed": 5, "data": {"max_prompt_len": 9}})
    new = update_config(cfg, {"data": {"max_answer_len": 11}})
    assert (new.seed, new.data.max_prompt_len, new.data.max_answer_len) == (5, 9, 11)


@pytest.mark.parametrize("glob_bs, micro, world, accum", [(None, 4, 1, 1), (32, 4, 2, 4), (24, 3, 1, 8), (6, 3, 2, 1)])
def test_batch_geometry(glob_bs, micro, world, accum):
    g = batch_geometry(glob_bs, micro, world)
    assert g["gradient_accumulation_steps"] == accum
    assert g["train_batch_size"] == micro * accum * world


def test_batch_geometry_rejects_indivisible_with_a_fix():
    with pytest.raises(ConfigError, match=r"global_batch_size=30 is not a multiple of .* = 8; use e.g. "
                                          r"--global_batch_size 32 or 24"):
        batch_geometry(30, 4, 2)


def test_ds_config_zero3_offload_bf16():
    cfg = config_from_dict(TrainConfig, {"zero_stage": 3, "offload": "cpu", "dtype": "bf16", "micro_batch_size": 2,
                                         "global_batch_size": 16, "gradient_clipping": 0.5})
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5


def test_ds_config_stage2_offload_has_no_param_offload():
    ds = build_ds_config(config_from_dict(TrainConfig, {"zero_stage": 2, "offload": "cpu"}), 1)
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_user_ds_config_replaces_generated_and_fills_auto(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                             "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 1},
                             "bf16": {"enabled": "auto"}, "custom_key": 7}))
    cfg = config_from_dict(TrainConfig, {"deepspeed_config": str(f), "micro_batch_size": 2, "global_batch_size": 8,
                                         "dtype": "bf16"})
    ds = build_ds_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1} and ds["custom_key"] == 7
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["bf16"]["enabled"] is True


def test_user_ds_config_inconsistent_batch(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                             "gradient_accumulation_steps": 1}))
    cfg = config_from_dict(TrainConfig, {"deepspeed_config": str(f)})
    with pytest.raises(ConfigError, match="train_batch_size \\(10\\) != micro \\(4\\)"):
        build_ds_config(cfg, world_size=1)
