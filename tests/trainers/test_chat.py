"""`fastrlhf chat` on a tiny saved model: one-shot and scripted multi-turn."""
import argparse

import pytest
import torch

from fastrlhf.rlhf.chat import ChatSession, add_chat_arguments, run_chat


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    d = tmp_path_factory.mktemp("chat_model")
    load_causal_lm(None, seed=3).save_pretrained(d)
    load_tokenizer(None).save_pretrained(d)
    return str(d)


def _args(model_dir, *extra):
    p = argparse.ArgumentParser()
    add_chat_arguments(p)
    return p.parse_args(["--model", model_dir, "--max_new_tokens", "6", *extra])


def test_one_shot_prompt_prints_one_answer(model_dir):
    out = []
    assert run_chat(_args(model_dir, "--prompt", "describe the lake in a happy tone", "--greedy"),
                    write=out.append) == 0
    assert len(out) == 1 and isinstance(out[0], str)


def test_multi_turn_history_is_in_the_next_prompt_and_clear_resets(model_dir):
    s = ChatSession(model_dir, max_new_tokens=5, greedy=True)
    first = s.reply("describe the lake in a happy tone")
    ids_turn2 = s.render(s.messages + [{"role": "user", "content": "and the river"}])
    ids_alone = s.render([{"role": "user", "content": "and the river"}])
    assert len(ids_turn2) > len(ids_alone)
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[1]["content"] == first
    s.reply("and the river")
    assert len(s.messages) == 4
    script = iter(["describe the lake", "clear", "quit"])
    out = []
    run_chat(_args(model_dir), read=lambda _: next(script), write=out.append)
    assert any(line.startswith("bot> ") for line in out) and "(new conversation)" in out


def test_greedy_reply_matches_plain_hf_greedy(model_dir):
    from transformers import AutoModelForCausalLM
    s = ChatSession(model_dir, max_new_tokens=5, greedy=True)
    ids = torch.tensor([s.render([{"role": "user", "content": "describe the lake"}])])
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hf = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                          eos_token_id=s.tokenizer.eos_token_id, pad_token_id=s.tokenizer.pad_token_id)
    new = hf[0, ids.shape[1]:].tolist()
    if s.tokenizer.eos_token_id in new:
        new = new[:new.index(s.tokenizer.eos_token_id)]
    assert s.reply("describe the lake") == s.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_too_long_message_is_a_clear_error_and_the_session_survives(model_dir):
    s = ChatSession(model_dir, max_new_tokens=5, greedy=True)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        s.reply("lake " * 400)
    assert s.messages == []


def test_input_that_is_not_utf8_is_replaced_with_a_warning_and_the_session_goes_on(model_dir, monkeypatch):
    """A terminal in another encoding, a pasted binary: the bytes are replaced (U+FFFD) with a
    warning, never a traceback that ends the session."""
    import io
    import sys
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 by the lake\ndescribe the lake\nquit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)  # strict UTF-8, as a terminal's stdin is
    out = []
    assert run_chat(_args(model_dir, "--greedy"), write=out.append) == 0
    warnings = [line for line in out if "not UTF-8" in line]
    assert len(warnings) == 1 and "1 byte" in warnings[0] and "caf\ufffd by the lake" in warnings[0], out
    assert sum(line.startswith("bot> ") for line in out) == 2, out
    # --prompt too (the shell hands Python undecodable argv bytes as surrogates)
    out = []
    assert run_chat(_args(model_dir, "--prompt", "caf\udce9", "--greedy"), write=out.append) == 0
    assert any("not UTF-8" in line for line in out) and not out[-1].startswith("(warning")
