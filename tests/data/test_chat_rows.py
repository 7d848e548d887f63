"""Chat rows whose last turn is the user's have nothing for SFT to learn: `fastrlhf sft` says so in
one line (not that the data "needs chat messages", which it has)."""
import json

from conftest import run_cli
from fastrlhf.data import DataSpec, build_datasets
from fastrlhf.models.loading import load_tokenizer


def test_sft_on_chat_rows_ending_with_the_user_names_the_missing_assistant_turn(tmp_path, capsys, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": f"describe the {w} lake"},
                          {"role": "assistant", "content": f"a {w} lake"},
                          {"role": "user", "content": "and the river?"}]} for w in ("calm", "cold", "deep", "wide")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")
    rc, _, err = run_cli(["sft", "--data.paths", str(path), "--data.eval_fraction", "0",
                          "--output_dir", str(tmp_path / "o")], capsys)
    assert rc == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert "no assistant turn to learn" in line and "ends with a user turn" in line, line
    assert "needs a prompt and an answer" not in line and "chat messages" not in line and str(path) in line, line
    # the same rows are fine as step-3 prompts
    train, _ = build_datasets(DataSpec(paths=[str(path)], eval_fraction=0.0), load_tokenizer(None), 3)
    assert len(train) == 4


def test_step3_items_keep_the_prompts_messages_for_multi_turn_rollouts(tmp_path):
    """Multi-turn rollouts render a prompt again (with the tools described): step-3 items keep the
    prompt as messages, and PromptCollator passes them on beside the rendered text."""
    from fastrlhf.data import PromptCollator
    rows = [{"messages": [{"role": "user", "content": f"describe the {w} lake"},
                          {"role": "assistant", "content": f"a {w} lake"},
                          {"role": "user", "content": "and the river?"}]} for w in ("calm", "cold")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(None)
    train, _ = build_datasets(DataSpec(paths=[str(path)], eval_fraction=0.0), tok, 3)
    items = [train[i] for i in range(len(train))]
    by_first = {r["messages"][0]["content"]: r["messages"] for r in rows}
    assert sorted(it["prompt_messages"][0]["content"] for it in items) == sorted(by_first)
    assert all(it["prompt_messages"] == by_first[it["prompt_messages"][0]["content"]] for it in items)
    batch = PromptCollator(tok.pad_token_id)(items)
    assert batch["prompt_messages"] == [it["prompt_messages"] for it in items]
