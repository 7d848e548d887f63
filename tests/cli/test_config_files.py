"""Config files as a user writes them: a key given twice, `~` in a path, a bad value hidden by a
command-line flag for a sibling key. Each is a one-line ConfigError naming the key, or (for `~`)
the path the user meant."""
import json
import os

import pytest

from fastrlhf import cli
from fastrlhf.errors import ConfigError
from fastrlhf.options import config_from_dict, load_config_file, parse_config
from fastrlhf.rlhf.configs import SFTConfig


@pytest.mark.parametrize("name, text, key", [
    ("twice.yaml", "learning_rate: 1.0e-4\nzero_stage: 2\nlearning_rate: 3.0e-4\n", "learning_rate"),
    ("nested.yaml", "data:\n  max_prompt_len: 40\n  max_prompt_len: 48\n", "data.max_prompt_len"),
    ("twice.json", '{"max_steps": 3, "data": {"paths": ["a"]}, "max_steps": 4}', "max_steps"),
    ("nested.json", '{"data": {"seed": 1, "seed": 2}}', "data.seed"),
])
def test_a_key_given_twice_is_refused_naming_it(tmp_path, name, text, key):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {f}: the key {key!r} is given twice"):
        load_config_file(str(f))


def test_a_tilde_in_a_path_means_the_home_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = tmp_path / "run.yaml"
    f.write_text("output_dir: ~/runs/a\ndata:\n  paths: [~/data/a.jsonl, rel.jsonl]\n")
    cfg = parse_config(SFTConfig, ["--config", str(f), "--tokenizer", "~/tok"])
    home = str(tmp_path / "home")
    assert cfg.output_dir == os.path.join(home, "runs/a")
    assert cfg.data.paths == [os.path.join(home, "data/a.jsonl"), "rel.jsonl"]
    assert cfg.tokenizer == os.path.join(home, "tok")


def test_a_bad_section_in_the_file_is_refused_even_when_a_flag_sets_a_key_in_it(tmp_path, capsys, monkeypatch):
    f = tmp_path / "run.yaml"
    f.write_text("data: 5\n")
    with pytest.raises(ConfigError, match="data must be a mapping"):
        parse_config(SFTConfig, ["--config", str(f)])
    with pytest.raises(ConfigError, match=r"config key 'data' is 5, but it is a section of options \(data.max_prompt_len"):
        parse_config(SFTConfig, ["--config", str(f), "--data.max_prompt_len", "64"])
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--config", str(f), "--data.max_prompt_len", "64", "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config key 'data' is 5" in err
    assert not os.path.exists(tmp_path / "o")
    # the same from a dict (the API): a section given a scalar is refused, an empty one (None) is fine
    assert config_from_dict(SFTConfig, json.loads('{"data": {"max_prompt_len": 8}}')).data.max_prompt_len == 8
