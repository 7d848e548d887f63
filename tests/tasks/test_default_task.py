"""The bundled default task: exact scorer, shipped data, tokenizer and tiny model config."""
import json
import random

import pytest

from fastrlhf.tasks import default_task as task
from fastrlhf.tasks.default_task import (default_data_path, default_model_dir, generate_rows, ground_truth_score,
                                        prompt_tone)


def test_scorer_on_hand_made_examples():
    happy = "Describe the garden in a happy tone."
    sad = "Human: Write a sad sentence about the old river.\n\nAssistant:"      # a chat-rendered prompt
    # 9 words, 3 happy, 1 sad -> (3 - 1) / 9
    assert ground_truth_score(happy, "The garden is joyful, bright and sunny but cold.") == pytest.approx(2 / 9)
    assert ground_truth_score(sad, "The garden is joyful, bright and sunny but cold.") == pytest.approx(-2 / 9)
    # 11 words, 4 sad -> 4 / 11; case and punctuation do not matter
    assert ground_truth_score(sad, "The RIVER is GLOOMY, grey; the sky looks bleak and dark!") == pytest.approx(4 / 11)
    # short answers are divided by MIN_WORDS = 8, not by their own length
    assert ground_truth_score(happy, "joyful") == pytest.approx(1 / 8)
    assert ground_truth_score(happy, "joyful " * 12) == pytest.approx(1.0)
    assert ground_truth_score(sad, "joyful " * 12) == pytest.approx(-1.0)
    # no words at all, or only neutral ones
    assert ground_truth_score(happy, "") == 0.0
    assert ground_truth_score(happy, " ,.! ") == 0.0
    assert ground_truth_score(happy, "the old wooden bridge is long and narrow") == 0.0
    # "happy" and "sad" themselves are not lexicon words: naming the tone earns nothing
    assert ground_truth_score(happy, "happy happy happy happy happy happy happy happy") == 0.0


def test_scorer_rejects_prompts_without_exactly_one_tone():
    with pytest.raises(ValueError, match="exactly one tone"):
        ground_truth_score("Describe the garden.", "joyful")
    with pytest.raises(ValueError, match="exactly one tone"):
        prompt_tone("Describe the garden in a happy and sad tone.")
    assert prompt_tone("Give a SAD description of the lake.") == "sad"


def test_lexicons_are_disjoint_from_each_other_and_the_rest():
    lexicon = set(task.HAPPY) | set(task.SAD)
    assert not set(task.HAPPY) & set(task.SAD)
    others = set(task.NEUTRAL_ADJ) | set(task.TOPICS) | set(task.NOUNS) | set(task.PEOPLE) | set(task.TONES)
    assert not lexicon & others
    for template in task.PROMPT_TEMPLATES:
        assert not lexicon & set(template.lower().replace(".", " ").split())


def _rows():
    with open(default_data_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_chosen_beats_rejected_under_the_rule():
    rows = _rows()
    assert len(rows) == task.DEFAULT_ROWS
    gaps, chosen_scores = [], []
    for r in rows:
        c, j = ground_truth_score(r["prompt"], r["chosen"]), ground_truth_score(r["prompt"], r["rejected"])
        assert c - j >= task.MIN_SCORE_GAP - 1e-9, r
        gaps.append(c - j)
        chosen_scores.append(c)
    # the SFT targets are a mix of good and mediocre answers, well below the maximum of 1
    chosen_scores.sort()
    assert chosen_scores[len(rows) // 10] < 0.1 and chosen_scores[-len(rows) // 10] > 0.2
    assert chosen_scores[-1] < 0.6
    tones = [prompt_tone(r["prompt"]) for r in rows]
    assert 0.6 < tones.count("happy") / len(rows) < 0.8


def test_generator_is_deterministic_and_reproduces_the_shipped_file():
    a, b = generate_rows(seed=5, rows=50), generate_rows(seed=5, rows=50)
    assert a == b and generate_rows(seed=6, rows=50) != a
    assert generate_rows(task.DEFAULT_SEED, task.DEFAULT_ROWS) == _rows()


def test_regenerating_writes_identical_artefacts(tmp_path):
    task.write_default_task(str(tmp_path), rows=20)
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == open(f"{default_model_dir()}/{name}").read()
    # transformers stamps its own version into config.json and, across major versions, writes
    # different bookkeeping keys into tokenizer_config.json: compare what defines the artefacts.
    def load(d, name):
        with open(f"{d}/{name}") as f:
            return json.load(f)
    def rope(cfg):  # 5.x writes rope_parameters, 4.x rope_theta + rope_scaling: the same rope
        if "rope_parameters" not in cfg:
            cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"),
                                      **(cfg.pop("rope_scaling", None) or {"rope_type": "default"})}
        return cfg
    new_cfg, shipped_cfg = load(tmp_path, "config.json"), load(default_model_dir(), "config.json")
    new_cfg.pop("transformers_version", None)
    shipped_cfg.pop("transformers_version", None)
    assert rope(new_cfg) == rope(shipped_cfg)
    new_tc, shipped_tc = load(tmp_path, "tokenizer_config.json"), load(default_model_dir(), "tokenizer_config.json")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "padding_side",
                "chat_template"):
        assert new_tc.get(key) == shipped_tc.get(key), key


def test_shipped_tokenizer_and_config_load_and_fit_the_data():
    from transformers import AutoConfig, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    cfg = AutoConfig.from_pretrained(default_model_dir())
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert cfg.model_type == "llama" and cfg.vocab_size % 8 == 0 and cfg.vocab_size >= len(tok)
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.max_position_embeddings >= 256
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.bos_token_id,
                                                                       tok.eos_token_id)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Describe the lake in a sad tone."}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered == "Human: Describe the lake in a sad tone.\n\nAssistant:"
    rows = random.Random(0).sample(_rows(), 300)
    for r in rows:
        prompt_ids = tok(rendered).input_ids
        answer_ids = tok(r["chosen"], add_special_tokens=False).input_ids
        assert prompt_ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in tok(r["prompt"] + " " + r["chosen"] + " " + r["rejected"]).input_ids
        assert len(answer_ids) <= task.MAX_RESPONSE_TOKENS and len(tok(r["prompt"]).input_ids) <= 24
        # decoding keeps every word, so a generated answer scores the same after detokenization
        assert ground_truth_score(r["prompt"], tok.decode(answer_ids)) == ground_truth_score(r["prompt"], r["chosen"])


def test_tiny_model_builds_from_the_shipped_config():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(default_model_dir()))
    n_params = sum(p.numel() for p in model.parameters())
    assert 5e5 < n_params < 5e6
    out = model(torch.tensor([[1, 5, 9, 2]]))
    assert out.logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(out.logits).all()
