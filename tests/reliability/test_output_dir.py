"""Nothing of the user's is deleted or overwritten by a run: an output dir that holds files
fastrlhf did not write is refused unless the user says --overwrite_output_dir true, and even then
a save removes only what an earlier fastrlhf save in that dir wrote; an output dir that is one of
the run's own input models is refused, naming both."""
import json
import os

import pytest

from conftest import run_cli as run
from fastrlhf import cli

TINY = ["--data.max_samples", "32", "--micro_batch_size", "8", "--eval_max_batches", "1", "--log_steps", "1"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")


def last_line(err):
    return err.strip().splitlines()[-1]


def snapshot(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d)] = open(path, "rb").read()
    return out


def test_a_dir_of_the_users_files_is_refused_then_written_into_without_deleting_any(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "keep").mkdir(parents=True)
    users = {"notes.txt": b"my notes", "pytorch_model.bin": b"not fastrlhf's", "my_lora.safetensors": b"x" * 16,
             "vocab.txt": b"a\nb\n", "shards.index.json": b"{}", "keep/data.jsonl": b'{"a": 1}\n'}
    for name, data in users.items():
        (mine / name).write_bytes(data)
    out = str(mine)

    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--output_dir", out], capsys)
    assert rc == 2
    line = last_line(err)
    for needle in (f"output_dir {out} is not empty and was not written by fastrlhf", "keep/", "notes.txt",
                   "pytorch_model.bin", "--overwrite_output_dir true"):
        assert needle in line, (needle, line)
    assert snapshot(out) == users  # refused before anything was written (no lock, no config)

    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--overwrite_output_dir", "true", "--output_dir", out], capsys)
    assert rc == 0, err[-3000:]
    after = snapshot(out)
    assert {k: after.get(k) for k in users} == users  # every file of the user's is still there, unchanged
    assert "model.safetensors" in after and "config.json" in after
    # a second run into the dir (fastrlhf wrote it now) is accepted and still deletes nothing of the user's
    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--resume", "no", "--output_dir", out], capsys)
    assert rc == 0, err[-3000:]
    after = snapshot(out)
    assert {k: after.get(k) for k in users} == users


def test_a_plain_hf_model_dir_is_not_overwritten_silently(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = tmp_path / "hf_model"
    cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(hf))
    before = snapshot(hf)
    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--output_dir", str(hf)], capsys)
    assert rc == 2
    line = last_line(err)
    assert "is not empty and was not written by fastrlhf" in line and "config.json" in line
    assert "model.safetensors" in line and "--overwrite_output_dir true" in line
    assert snapshot(hf) == before


def test_a_save_removes_only_what_an_earlier_fastrlhf_save_wrote(tmp_path):
    """The model-file manifest: a save replaces the previous save's files (a stale LoRA adapter
    must not be loaded on top of new weights) and nothing else."""
    import torch
    from fastrlhf.rlhf.checkpoint import save_hf_model
    from fastrlhf.rlhf.model_files import MODEL_MANIFEST
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path / "o"
    out.mkdir()
    (out / "users.bin").write_bytes(b"u")
    (out / "tokenizer.json").write_bytes(b"{}")  # same name as a tokenizer file, not written by a save here
    save_hf_model(model, str(out))
    written = json.load(open(out / MODEL_MANIFEST))["files"]
    assert "model.safetensors" in written and "users.bin" not in written
    # an earlier save's extra file (as a LoRA save leaves fastrlhf_lora.*) is in the manifest: it goes
    (out / "fastrlhf_lora.safetensors").write_bytes(b"stale")
    json.dump({"files": written + ["fastrlhf_lora.safetensors"]}, open(out / MODEL_MANIFEST, "w"))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_hf_model(model, str(out))
    assert not (out / "fastrlhf_lora.safetensors").exists()
    assert (out / "users.bin").read_bytes() == b"u" and (out / "tokenizer.json").read_bytes() == b"{}"


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A finished 2-step SFT run with checkpoint-2."""
    out = str(tmp_path_factory.mktemp("sft_run") / "sft")
    assert cli.main(["sft", *TINY, "--max_steps", "2", "--save_steps", "2", "--output_dir", out]) == 0
    return out


def test_an_output_dir_that_is_an_input_model_is_refused_naming_both(sft_dir, tmp_path, capsys):
    from fastrlhf.errors import ConfigError
    from fastrlhf.rlhf.configs import PPOConfig, SFTConfig
    before = snapshot(sft_dir)
    rc, _, err = run(["sft", *TINY, "--model_name_or_path", sft_dir, "--output_dir", sft_dir + "/"], capsys)
    assert rc == 2
    line = last_line(err)
    assert f"--output_dir {sft_dir}/ is the input model of --model_name_or_path {sft_dir}" in line, line
    assert snapshot(sft_dir) == before
    for key in ("reward_model", "critic_model", "ref_model"):
        cfg = PPOConfig(reward_fn=[] if key == "reward_model" else ["fastrlhf.rewards:format_reward"],
                        output_dir=sft_dir, **{key: sft_dir})
        with pytest.raises(ConfigError, match=f"is the input model of --{key} {sft_dir}"):
            cfg.check_inputs()
    # a checkpoint inside the output dir is an input the run could delete (save_total_limit, a fresh start)
    ckpt = os.path.join(sft_dir, "checkpoint-2")
    with pytest.raises(ConfigError, match=f"--model_name_or_path {ckpt} lies inside --output_dir"):
        SFTConfig(model_name_or_path=ckpt, output_dir=sft_dir).check_inputs()


def test_resume_refusals_name_the_other_kind_of_run_and_resume_dir_first(sft_dir, tmp_path, capsys):
    ckpt = os.path.join(sft_dir, "checkpoint-2")
    # a checkpoint of another kind of run: said first, not "past the steps of this run"
    rc, _, err = run(["rm", *TINY, "--max_steps", "1", "--resume", ckpt, "--output_dir", str(tmp_path / "rm")],
                     capsys)
    assert rc == 2
    line = last_line(err)
    assert f"{ckpt} is a checkpoint of an SFT run (fastrlhf sft), not of this reward-model run" in line, line
    assert "max_steps" not in line
    # another run's checkpoint under --resume auto: --resume DIR (keeps them) is offered before --resume no
    rc, _, err = run(["sft", *TINY, "--max_steps", "2", "--learning_rate", "5e-3", "--output_dir", sft_dir], capsys)
    assert rc == 2
    line = last_line(err)
    assert "learning_rate" in line and f"--resume {ckpt}" in line and "--resume no" in line, line
    assert line.index(f"--resume {ckpt}") < line.index("--resume no")


def test_options_that_do_not_change_what_is_learned_leave_the_fingerprint_alone():
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.fingerprint import fingerprint_diff, run_fingerprint
    base = dict(reward_url=["http://127.0.0.1:1/r"])
    saved = run_fingerprint(PPOConfig(**base), "ppo")
    for key, value in (("reward_timeout", 5.0), ("reward_retries", 0), ("reward_concurrency", 9),
                       ("reward_request_size", 3), ("log_steps", 1), ("eval_prompts", 3)):
        assert fingerprint_diff(saved, run_fingerprint(PPOConfig(**base, **{key: value}), "ppo")) == [], key
    assert fingerprint_diff(saved, run_fingerprint(PPOConfig(**base, kl_coef=0.5), "ppo")) == ["kl_coef 0.05 -> 0.5"]


def test_editing_a_reward_function_is_another_run(tmp_path, monkeypatch):
    """The reward function's source is in the fingerprint: a run resumed after editing it would
    train on another reward than its checkpoint's."""
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.fingerprint import fingerprint_diff, run_fingerprint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_scores.py").write_text("def score(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    cfg = PPOConfig(reward_fn=["my_scores:score", "fastrlhf.rewards:format_reward"])
    saved = run_fingerprint(cfg, "ppo")
    assert fingerprint_diff(saved, run_fingerprint(cfg, "ppo")) == []
    (tmp_path / "my_scores.py").write_text("def score(prompts, completions, **_):\n    return [2.0] * len(completions)\n")
    assert fingerprint_diff(saved, run_fingerprint(cfg, "ppo")) == ["the code of the reward function my_scores:score "
                                                                    "changed"]
