"""Chat rows whose last turn is the user's have nothing for SFT to learn: the error says so (not
that the data "needs chat messages", which it has)."""
import json

import pytest

from fastrlhf.data import DataSpec, build_datasets
from fastrlhf.errors import DataError
from fastrlhf.models.loading import load_tokenizer


def test_sft_on_chat_rows_ending_with_the_user_names_the_missing_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"describe the {w} lake"},
                          {"role": "assistant", "content": f"a {w} lake"},
                          {"role": "user", "content": "and the river?"}]} for w in ("calm", "cold", "deep", "wide")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(None)
    with pytest.raises(DataError) as e:
        build_datasets(DataSpec(paths=[str(path)], eval_fraction=0.0), tok, 1)
    message = str(e.value)
    assert "no assistant turn to learn" in message and "ends with a user turn" in message, message
    assert "needs a prompt and an answer" not in message and str(path) in message
    # the same rows are fine as step-3 prompts
    train, _ = build_datasets(DataSpec(paths=[str(path)], eval_fraction=0.0), tok, 3)
    assert len(train) == 4
