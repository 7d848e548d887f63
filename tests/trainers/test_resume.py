"""The one checkpoint format: every fixed-dataset trainer (SFT, reward model, DPO) resumes from
checkpoint-<step>/ with the same losses as an uninterrupted run, every checkpoint is a loadable HF
model, a save killed midway is never resumed from, and other runs' checkpoints are refused.
(PPO/GRPO's resume test is in test_ppo.py.)"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from fastrlhf.errors import ConfigError
from fastrlhf.models.loading import load_tokenizer
from fastrlhf.models.reward import RewardModel
from fastrlhf.rlhf.configs import DPOConfig, RMConfig, SFTConfig
from fastrlhf.rlhf.dpo import train_dpo
from fastrlhf.rlhf.reward_trainer import train_reward_model
from fastrlhf.rlhf.sft import train_sft
from toys import ToyPairCollator, ToyPairDataset, ToySFTCollator, ToySFTDataset, make_tiny_model_dir, tiny_train_kwargs


def _sft(cfg, tok):
    return train_sft(cfg, tokenizer=tok, datasets=(ToySFTDataset(40, 0), ToySFTDataset(8, 1)),
                     collate=ToySFTCollator(tok.pad_token_id))


def _rm(cfg, tok):
    return train_reward_model(cfg, tokenizer=tok, datasets=(ToyPairDataset(40, 0), ToyPairDataset(8, 1)),
                              collate=ToyPairCollator(tok.pad_token_id))


def _dpo(cfg, tok):
    return train_dpo(cfg, tokenizer=tok, datasets=(ToyPairDataset(40, 0), ToyPairDataset(8, 1)),
                     collate=ToyPairCollator(tok.pad_token_id))


TRAINERS = {"sft": (SFTConfig, _sft), "rm": (RMConfig, _rm), "dpo": (DPOConfig, _dpo)}


@pytest.mark.parametrize("kind, zero_stage", [("sft", 0), ("sft", 2), ("rm", 0), ("dpo", 0)])
def test_resumed_run_continues_at_the_same_step_with_the_same_loss(tmp_path, kind, zero_stage):
    cls, train = TRAINERS[kind]
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    out = str(tmp_path / "out")
    # 40 examples / 8 per step = 5 steps per epoch: the checkpoint at step 8 sits mid-epoch 2,
    # and the cosine schedule, Adam moments and data position must all be restored
    kw = tiny_train_kwargs(model_dir, out, max_steps=11, num_epochs=5, save_steps=4, save_total_limit=0,
                           lr_scheduler="cosine", warmup_steps=2, zero_stage=zero_stage, resume="auto",
                           eval_max_batches=1)
    full = train(cls(**kw), tok)
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == \
        ["checkpoint-11", "checkpoint-4", "checkpoint-8"]
    shutil.rmtree(os.path.join(out, "checkpoint-11"))  # as if the run had been killed after step 8
    resumed = train(cls(**kw), tok)
    assert sorted(resumed["losses"]) == [9, 10, 11]
    for step in (9, 10, 11):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6, abs=1e-7), step
    # "eval before" is the one taken when the run started, not the resumed model's
    assert resumed["eval_before"] == full["eval_before"]
    # a checkpoint holds the model in HF format, loadable as it is
    ckpt = os.path.join(out, "checkpoint-8")
    if kind == "rm":
        RewardModel.from_pretrained(ckpt)
    AutoModelForCausalLM.from_pretrained(ckpt)  # the reward model's backbone loads with a fresh LM head


def test_save_total_limit_keeps_the_newest(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    out = tmp_path / "out"
    _sft(SFTConfig(**tiny_train_kwargs(model_dir, str(out), max_steps=5, save_steps=1, save_total_limit=2,
                                       eval_max_batches=1)), tok)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf import checkpoint
    from fastrlhf.rlhf.configs import SFTConfig
    from fastrlhf.rlhf.sft import train_sft
    from toys import ToySFTCollator, ToySFTDataset, tiny_train_kwargs
    model_dir, out = sys.argv[1], sys.argv[2]
    real_save = checkpoint.save_hf_model

    def save_then_die(engine, path, **kw):  # killed after the weights of step 4, before the rest
        real_save(engine, path, **kw)
        if "checkpoint-4" in path:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_hf_model = save_then_die
    tok = load_tokenizer(model_dir)
    cfg = SFTConfig(**tiny_train_kwargs(model_dir, out, max_steps=6, num_epochs=2, save_steps=2, save_total_limit=0,
                                        eval_max_batches=1))
    train_sft(cfg, tokenizer=tok, datasets=(ToySFTDataset(40, 0), ToySFTDataset(8, 1)),
              collate=ToySFTCollator(tok.pad_token_id))
""")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_for_resume(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    out = tmp_path / "out"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), model_dir, str(out)], capture_output=True, text=True,
                          timeout=300, env=dict(env, FASTRLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1",
                                                PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))  # toys
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "checkpoint-4.partial" / "model.safetensors").is_file()  # the half-written save is there...
    from fastrlhf.rlhf.checkpoint import find_resume_checkpoint
    assert find_resume_checkpoint(str(out), "auto") == str(out / "checkpoint-2")  # ...and never picked
    tok = load_tokenizer(model_dir)
    kw = tiny_train_kwargs(model_dir, str(out), max_steps=6, num_epochs=2, save_steps=2, save_total_limit=0,
                           eval_max_batches=1, resume="auto")
    resumed = _sft(SFTConfig(**kw), tok)
    assert sorted(resumed["losses"]) == [3, 4, 5, 6]
    assert not (out / "checkpoint-4.partial").exists() and (out / "checkpoint-4" / "trainer_state.json").is_file()
    fresh = _sft(SFTConfig(**dict(kw, output_dir=str(tmp_path / "fresh"), resume="no")), tok)
    for step in (3, 4, 5, 6):
        assert resumed["losses"][step] == pytest.approx(fresh["losses"][step], rel=1e-6, abs=1e-7)


def _fake_checkpoint(d):
    """The files a verified checkpoint needs (checkpoint.checkpoint_problem), with tiny contents."""
    import json
    import torch
    from safetensors.torch import save_file
    (d / "ds_state" / "model" / "state").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    torch.save({}, d / "ds_state" / "model" / "state" / "mp_rank_00_model_states.pt")
    torch.save({}, d / "rank_state_0.pt")
    (d / "trainer_state.json").write_text(json.dumps({"format": 2, "step": 2, "world_size": 1, "roles": ["model"]}))


def test_incomplete_and_foreign_checkpoints_are_not_resumed(tmp_path):
    from fastrlhf.rlhf.checkpoint import find_resume_checkpoint
    (tmp_path / "checkpoint-3").mkdir()
    _fake_checkpoint(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-5.partial").mkdir()
    _fake_checkpoint(tmp_path / "checkpoint-5.partial")
    assert find_resume_checkpoint(str(tmp_path), "auto").endswith("checkpoint-2")
    assert find_resume_checkpoint(str(tmp_path), "no") is None
    with pytest.raises(ConfigError, match="not a complete fastrlhf checkpoint"):
        find_resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-3"))
    old_ppo = tmp_path / "old_ppo"
    (old_ppo / "checkpoints" / "step_4").mkdir(parents=True)
    (old_ppo / "checkpoints" / "step_4" / "COMPLETE").write_text("4")
    with pytest.raises(ConfigError, match="older format.*--resume no"):
        find_resume_checkpoint(str(old_ppo), "auto")


def test_a_checkpoint_of_another_trainer_or_format_is_refused(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    out = str(tmp_path / "out")
    kw = tiny_train_kwargs(model_dir, out, max_steps=2, save_steps=2, eval_max_batches=1, resume="auto")
    _sft(SFTConfig(**kw), tok)
    state = os.path.join(out, "checkpoint-2", "trainer_state.json")
    text = open(state).read()
    open(state, "w").write(text.replace('"format": 2', '"format": 1'))
    with pytest.raises(ConfigError, match="older fastrlhf"):
        _sft(SFTConfig(**dict(kw, max_steps=3)), tok)
    open(state, "w").write(text.replace('"roles": [\n  "model"\n ]', '"roles": [\n  "x"\n ]'))
    os.rename(os.path.join(out, "checkpoint-2", "ds_state", "model"), os.path.join(out, "checkpoint-2", "ds_state", "x"))
    with pytest.raises(ConfigError, match=r"no saved state for \['model'\]"):
        _sft(SFTConfig(**dict(kw, max_steps=3)), tok)
