import os
import shutil

import pytest

from fastrlhf.config import SFTConfig
from fastrlhf.models.loading import load_tokenizer
from fastrlhf.rlhf.sft import train_sft
from fastrlhf.utils.testing import ToySFTCollator, ToySFTDataset, make_tiny_model_dir, tiny_train_kwargs


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resumed_run_continues_at_the_same_step_with_the_same_loss(tmp_path, zero_stage):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    out = str(tmp_path / "out")
    # 40 examples / 8 per step = 5 steps per epoch: the checkpoint at step 8 sits mid-epoch 2,
    # and the cosine schedule, Adam moments and data position must all be restored
    kw = tiny_train_kwargs(model_dir, out, max_steps=11, num_epochs=5, save_steps=4, save_total_limit=0,
                           lr_scheduler="cosine", warmup_steps=2, zero_stage=zero_stage, resume="auto",
                           eval_max_batches=1)

    def run():
        return train_sft(SFTConfig(**kw), tokenizer=tok, datasets=(ToySFTDataset(40, 0), ToySFTDataset(8, 1)),
                         collate=ToySFTCollator(tok.pad_token_id))

    full = run()
    assert sorted(os.listdir(out)).count("checkpoint-8") == 1 and os.path.isdir(os.path.join(out, "checkpoint-11"))
    shutil.rmtree(os.path.join(out, "checkpoint-11"))  # as if the run had been killed after step 8
    resumed = run()
    assert sorted(resumed["losses"]) == [9, 10, 11]
    for step in (9, 10, 11):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6, abs=1e-7), step


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from fastrlhf.rlhf.checkpoint import find_resume_checkpoint
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert find_resume_checkpoint(str(tmp_path), "auto").endswith("checkpoint-2")
    assert find_resume_checkpoint(str(tmp_path), "no") is None
    with pytest.raises(ValueError, match="not a complete fastrlhf checkpoint"):
        find_resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-3"))
