"""fastrlhf.data: splits, blending, rendering, masking, padding, length limits, caching, formats."""
import json
import logging
import re

import pytest
import torch

from fastrlhf.data import (DataError, DataSpec, PairCollator, PromptCollator, SFTCollator, build_datasets,
                           split_indices)

ROW_ID = re.compile(r"item (\d+) of (\w+)")


def make_tokenizer(folder, corpus, chat_template=None):
    """A small byte-level BPE trained on ``corpus``, saved and loaded back by path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   chat_template=chat_template)
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def pair_rows(n, tag="a"):
    return [{"prompt": f"Say item {i} of {tag} please", "chosen": f"good answer {i}",
             "rejected": f"bad answer {i}"} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CORPUS = [json.dumps(r) for r in pair_rows(50)] + ["Human: Assistant: <|user|> <|assistant|> item of beta"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok_plain"), CORPUS)


def only(step, path, **kw):
    """A spec that gives all rows of ``path`` to ``step``."""
    return DataSpec(paths=[path], split_ratios=["1,0,0", "0,1,0", "0,0,1"][step - 1], eval_fraction=0.0, **kw)


def row_ids(tokenizer, dataset, step):
    """(source tag, row number) of every item, read back from its prompt text."""
    out = []
    for item in dataset:
        if step == 3:
            text = item["prompt"]
        elif step == 2:
            text = tokenizer.decode(item["chosen_input_ids"])
        else:
            ids = item["input_ids"][item["labels"] == -100]
            text = tokenizer.decode(ids)
        m = ROW_ID.search(text)
        out.append((m.group(2), int(m.group(1))))
    return out


# ---------- splits and blending ----------

def test_split_indices_disjoint_cover_and_seeded():
    for n in (1, 7, 101, 1000):
        parts = split_indices(n, [0.2, 0.4, 0.4], seed=5)
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(n))
        if n >= 100:
            assert [len(p) for p in parts] == [round(n * 0.2), round(n * 0.6) - round(n * 0.2),
                                                n - round(n * 0.6)]
    assert split_indices(1000, [0.2, 0.4, 0.4], 5) == split_indices(1000, [0.2, 0.4, 0.4], 5)
    assert split_indices(1000, [0.2, 0.4, 0.4], 5) != split_indices(1000, [0.2, 0.4, 0.4], 6)


def test_steps_get_disjoint_rows_and_eval_is_held_out(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(200))
    spec = DataSpec(paths=[path], split_ratios="2,4,4", eval_fraction=0.1, seed=3)
    seen = {}
    for step in (1, 2, 3):
        train, evals = build_datasets(spec, tok, step)
        t, e = set(row_ids(tok, train, step)), set(row_ids(tok, evals, step))
        assert len(t) == len(train) and len(e) == len(evals) and not t & e
        seen[step] = t | e
    assert [len(seen[s]) for s in (1, 2, 3)] == [40, 80, 80]
    assert not seen[1] & seen[2] and not seen[1] & seen[3] and not seen[2] & seen[3]
    assert len(build_datasets(spec, tok, 2)[1]) == 8


def test_same_seed_same_parts_different_seed_different(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(120))

    def parts(seed):
        train, evals = build_datasets(DataSpec(paths=[path], seed=seed), tok, 2)
        return row_ids(tok, train, 2), row_ids(tok, evals, 2)

    assert parts(11) == parts(11)
    assert set(parts(11)[0]) != set(parts(12)[0])


def test_blending_uses_all_rows_or_the_weighted_fraction(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(100, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", pair_rows(60, "beta"))

    def counts(weights):
        spec = DataSpec(paths=[a, b], weights=weights, split_ratios="0,1,0", eval_fraction=0.0, seed=1)
        ids = row_ids(tok, build_datasets(spec, tok, 2)[0], 2)
        return {tag: sum(t == tag for t, _ in ids) for tag in ("alpha", "beta")}, ids

    assert counts(None)[0] == {"alpha": 100, "beta": 60}
    assert counts([1.0, 0.5])[0] == {"alpha": 100, "beta": 30}
    got, ids = counts([2.0, 0.0])
    assert got == {"alpha": 200, "beta": 0}
    assert sorted(set(ids)) == [("alpha", i) for i in range(100)]
    # the blend is shuffled, not one dataset after the other
    tags = [t for t, _ in counts(None)[1]]
    assert tags[:60] != ["alpha"] * 60


def test_max_samples_caps_train_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(200))
    train, evals = build_datasets(DataSpec(paths=[path], max_samples=17), tok, 3)
    assert len(train) == 17 and len(evals) == 1


# ---------- rendering and tokenization ----------

def test_plain_template_without_chat_template(tmp_path, tok):
    assert not tok.chat_template
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say item 1 of a please", "response": "ok then"}])
    prompt_item = build_datasets(only(3, path), tok, 3)[0][0]
    assert prompt_item["prompt"] == "Human: Say item 1 of a please\n\nAssistant:"
    sft = build_datasets(only(1, path), tok, 1)[0][0]
    expected = tok("Human: Say item 1 of a please\n\nAssistant:").input_ids + \
        tok(" ok then", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert sft["input_ids"].tolist() == expected
    assert expected[0] == tok.bos_token_id


def test_plain_template_renders_multi_turn_messages(tmp_path, tok):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "item 1 of x"},
                          {"role": "assistant", "content": "first"}, {"role": "user", "content": "more"},
                          {"role": "assistant", "content": "second"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert build_datasets(only(3, path), tok, 3)[0][0]["prompt"] == (
        "Be brief.\n\nHuman: item 1 of x\n\nAssistant: first\n\nHuman: more\n\nAssistant:")
    item = build_datasets(only(1, path), tok, 1)[0][0]
    answer = item["input_ids"][item["labels"] != -100].tolist()
    assert answer == tok(" second", add_special_tokens=False).input_ids + [tok.eos_token_id]


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_template_used_when_the_tokenizer_has_one(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", CORPUS, chat_template=TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": "item 3 of z"}, {"role": "assistant", "content": "sure"}]},
            {"prompt": "item 4 of z", "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows[:1])
    rendered = tok.apply_chat_template([{"role": "user", "content": "item 3 of z"}], tokenize=False,
                                       add_generation_prompt=True)
    assert build_datasets(only(3, path), tok, 3)[0][0]["prompt"] == rendered == "<s><|user|>\nitem 3 of z</s>\n<|assistant|>\n"
    item = build_datasets(only(1, path), tok, 1)[0][0]
    # the template writes BOS itself: no second BOS; its EOS after the answer is the one EOS
    ids = item["input_ids"].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert ids[:-1][-len(tok("sure", add_special_tokens=False).input_ids):] == tok("sure", add_special_tokens=False).input_ids
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "user", "content": "item 3 of z"}, {"role": "assistant", "content": "sure"}], tokenize=False).rstrip("\n")
    # plain prompt/chosen/rejected strings go through the same template as a user turn
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows[1:])
    pair = build_datasets(DataSpec(paths=[pairs], split_ratios="0,1,0", eval_fraction=0.0), tok, 2)[0][0]
    assert tok.decode(pair["chosen_input_ids"]) == "<s><|user|>\nitem 4 of z</s>\n<|assistant|>\nyes</s>"
    assert tok.decode(pair["rejected_input_ids"]) == "<s><|user|>\nitem 4 of z</s>\n<|assistant|>\nno</s>"


def test_sft_labels_mask_the_prompt_unless_train_on_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(30))
    for train_on_prompt in (False, True):
        train = build_datasets(only(1, path, train_on_prompt=train_on_prompt), tok, 1)[0]
        assert len(train) == 30
        for item in train:
            ids, labels = item["input_ids"], item["labels"]
            i = int(ROW_ID.search(tok.decode(ids)).group(1))
            prompt = tok(f"Human: Say item {i} of a please\n\nAssistant:").input_ids
            answer = tok(f" good answer {i}", add_special_tokens=False).input_ids + [tok.eos_token_id]
            assert ids.tolist() == prompt + answer
            expected = prompt + answer if train_on_prompt else [-100] * len(prompt) + answer
            assert labels.tolist() == expected


def test_collators_pad_right_for_training_and_left_for_prompts():
    a, b = torch.tensor([5, 6, 7]), torch.tensor([8])
    sft = SFTCollator(0)([{"input_ids": a, "labels": torch.tensor([-100, 6, 7])}, {"input_ids": b, "labels": b}])
    assert sft["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert sft["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert sft["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    pairs = PairCollator(0)([{"chosen_input_ids": a, "rejected_input_ids": b},
                             {"chosen_input_ids": b, "rejected_input_ids": torch.tensor([9, 9])}])
    assert pairs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [8, 0, 0], [9, 9, 0]]
    assert pairs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    prompts = PromptCollator(3)([{"prompt_input_ids": b, "prompt": "x"}, {"prompt_input_ids": a, "prompt": "y"},
                                 {"prompt_input_ids": torch.tensor([1, 2]), "prompt": "z"}])
    assert prompts["input_ids"].tolist() == [[3, 3, 8], [5, 6, 7], [3, 1, 2]]
    assert prompts["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert prompts["prompt"] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="pad token"):
        PromptCollator(None)


def test_repeating_a_collated_prompt_batch_equals_collating_each_item_group_size_times():
    """ExperienceMaker.sample collates its prompts once and repeats the rows for the scorers."""
    from fastrlhf.rlhf.experience import repeat_rows
    items = [{"prompt_input_ids": torch.tensor([5, 6, 7]), "prompt": "x", "columns": {"answer": "1"},
              "prompt_messages": [{"role": "user", "content": "x"}]},
             {"prompt_input_ids": torch.tensor([8]), "prompt": "y", "columns": {"answer": "2", "id": 4}},
             {"prompt_input_ids": torch.tensor([1, 2]), "prompt": "z"}]
    collate = PromptCollator(0)
    for g in (1, 3):
        repeated, expected = repeat_rows(collate(items), g), collate([it for it in items for _ in range(g)])
        assert repeated.keys() == expected.keys()
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(repeated[key], expected[key])
        for key in ("prompt", "columns", "prompt_messages"):
            assert repeated[key] == expected[key]
    assert repeat_rows(collate(items), 2)["prompt"] == ["x", "x", "y", "y", "z", "z"]


def test_prompt_collator_on_real_items_keeps_every_prompt_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(40) + [{"prompt": "item 99 of a " + "long " * 9,
                                                               "chosen": "c", "rejected": "r"}])
    train = build_datasets(DataSpec(paths=[path], split_ratios="0,0,1", eval_fraction=0.0), tok, 3)[0]
    items = [train[i] for i in range(len(train))]
    batch = PromptCollator(tok.pad_token_id)(items)
    width = batch["input_ids"].shape[1]
    for row, mask, item in zip(batch["input_ids"], batch["attention_mask"], items):
        n = len(item["prompt_input_ids"])
        assert torch.equal(row[width - n:], item["prompt_input_ids"])
        assert mask.tolist() == [0] * (width - n) + [1] * n
        assert (row[:width - n] == tok.pad_token_id).all()


# ---------- length limits ----------

def _long_rows():
    rows = pair_rows(30)
    for i in (2, 5, 11):
        rows[i]["prompt"] = f"Say item {i} of a " + "and more words " * 20
    rows[7]["chosen"] = "good answer " * 40
    return rows


def test_overlong_rows_dropped_and_counted(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", _long_rows())
    spec = DataSpec(paths=[path], split_ratios="0,1,0", eval_fraction=0.0, max_prompt_len=24, max_answer_len=16)
    # The "fastrlhf" logger stops propagation once get_logger() has set it up (any earlier test may
    # have), so hang pytest's handler on the data logger itself rather than relying on the root.
    data_logger = logging.getLogger("fastrlhf.data")
    data_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="fastrlhf.data"):
            train, _ = build_datasets(spec, tok, 2)
    finally:
        data_logger.removeHandler(caplog.handler)
    assert train.stats["prompt_overlong"] == 3 and train.stats["answer_overlong"] == 1
    assert train.stats["dropped"] == 4 and len(train) == 26 and train.stats["kept"] == 26
    assert {i for _, i in row_ids(tok, train, 2)} == set(range(30)) - {2, 5, 7, 11}
    assert "4 rows dropped" in caplog.text


def test_overlong_rows_truncated_from_the_left_keeping_bos(tmp_path, tok):
    rows = _long_rows()
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = DataSpec(paths=[path], split_ratios="0,0,1", eval_fraction=0.0, max_prompt_len=24, overlong="truncate")
    train, _ = build_datasets(spec, tok, 3)
    assert len(train) == 30 and train.stats["truncated"] == 3 and train.stats["prompt_overlong"] == 3
    for item in train:
        ids = item["prompt_input_ids"].tolist()
        full = tok(item["prompt"]).input_ids
        assert len(ids) <= 24 and ids[0] == tok.bos_token_id
        assert ids[1:] == full[len(full) - len(ids) + 1:]      # the end of the prompt survives
    sft = build_datasets(DataSpec(paths=[path], split_ratios="1,0,0", eval_fraction=0.0, max_answer_len=16,
                                  overlong="truncate"), tok, 1)[0]
    assert sft.stats["answer_overlong"] == 1
    assert max(int((it["labels"] != -100).sum()) for it in sft) == 16


# ---------- caching ----------

def test_cache_is_reused_and_keyed_by_spec(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", pair_rows(50))
    spec = DataSpec(paths=[path], cache_dir=str(tmp_path / "cache"))
    first = build_datasets(spec, tok, 1)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    import fastrlhf.data.build as build_mod

    def no_reading(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(build_mod, "read_source", no_reading)
    again = build_datasets(spec, tok, 1)
    assert [x["input_ids"].tolist() for x in again[0]] == [x["input_ids"].tolist() for x in first[0]]
    with pytest.raises(AssertionError, match="cache"):
        build_datasets(DataSpec(paths=[path], cache_dir=str(tmp_path / "cache"), seed=99), tok, 1)


# ---------- formats and sources ----------

def test_parquet_json_and_save_to_disk_sources(tmp_path, tok):
    import datasets
    rows = pair_rows(40)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(pair_rows(20, "test"))}).save_to_disk(str(tmp_path / "dd"))
    split = dict(split_ratios="2,4,4")  # the pipeline's split: each step gets its share
    ref_train, ref_eval = build_datasets(DataSpec(paths=[write_jsonl(tmp_path / "d.jsonl", rows)], **split), tok, 2)
    reference = row_ids(tok, ref_train, 2)
    for name in ("d.parquet", "d.json"):
        assert row_ids(tok, build_datasets(DataSpec(paths=[str(tmp_path / name)], **split), tok, 2)[0], 2) == reference
    train, evals = build_datasets(DataSpec(paths=[str(tmp_path / "dd")], **split), tok, 2)
    # no rows held out of train: the eval rows come from the test split
    assert sorted(row_ids(tok, train, 2)) == sorted(reference + row_ids(tok, ref_eval, 2))
    # the dataset's own test split supplies the eval rows (its step-2 share)
    assert {t for t, _ in row_ids(tok, evals, 2)} == {"test"} and len(evals) == 8


def test_hh_dialogue_pairs_and_chat_pairs(tmp_path, tok):
    hh = [{"chosen": "\n\nHuman: item 1 of hh\n\nAssistant: yes indeed",
           "rejected": "\n\nHuman: item 1 of hh\n\nAssistant: no"}]
    chat = [{"chosen": [{"role": "user", "content": "item 2 of cp"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "item 2 of cp"}, {"role": "assistant", "content": "bad"}]}]
    spec = dict(split_ratios="0,1,0", eval_fraction=0.0)
    item = build_datasets(DataSpec(paths=[write_jsonl(tmp_path / "hh.jsonl", hh)], **spec), tok, 2)[0][0]
    assert tok.decode(item["chosen_input_ids"]) == "<s>\n\nHuman: item 1 of hh\n\nAssistant: yes indeed</s>"
    assert tok.decode(item["rejected_input_ids"]) == "<s>\n\nHuman: item 1 of hh\n\nAssistant: no</s>"
    item = build_datasets(DataSpec(paths=[write_jsonl(tmp_path / "cp.jsonl", chat)], **spec), tok, 2)[0][0]
    assert tok.decode(item["chosen_input_ids"]) == "<s>Human: item 2 of cp\n\nAssistant: good</s>"


def test_steps_use_only_rows_that_have_what_they_need(tmp_path, tok):
    prompts_only = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"item {i} of p"} for i in range(20)])
    sft_only = write_jsonl(tmp_path / "s.jsonl", [{"question": f"item {i} of s", "answer": "x"} for i in range(20)])
    spec = DataSpec(paths=[prompts_only, sft_only], split_ratios="1,1,1", eval_fraction=0.0)
    assert {t for t, _ in row_ids(tok, build_datasets(spec, tok, 3)[0], 3)} == {"p", "s"}
    assert {t for t, _ in row_ids(tok, build_datasets(spec, tok, 1)[0], 1)} == {"s"}
    with pytest.raises(DataError, match="step 2.*pairs"):
        build_datasets(spec, tok, 2)


def test_alpaca_instruction_input_output(tmp_path, tok):
    rows = [{"instruction": "item 1 of al", "input": "extra context", "output": "done"},
            {"instruction": "item 2 of al", "input": "", "output": "done"}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    prompts = sorted(it["prompt"] for it in build_datasets(only(3, path), tok, 3)[0])
    assert prompts == ["Human: item 1 of al\n\nextra context\n\nAssistant:", "Human: item 2 of al\n\nAssistant:"]


def test_default_spec_loads_the_bundled_task():
    from transformers import AutoTokenizer

    from fastrlhf.tasks.default_task import default_model_dir, ground_truth_score
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    train, evals = build_datasets(DataSpec(max_samples=64), tok, 3)
    assert len(train) == 64 and len(evals) == 4
    for item in train:
        assert item["prompt"].startswith("Human: ") and item["prompt"].endswith("Assistant:")
        assert ground_truth_score(item["prompt"], "") == 0.0
        assert tok.unk_token_id not in item["prompt_input_ids"].tolist()


def test_spec_rejects_bad_options():
    for bad in (dict(split_ratios="1,2"), dict(split_ratios="a,b,c"), dict(overlong="cut"),
                dict(eval_fraction=1.0), dict(paths=["a", "b"], weights=[1.0]), dict(max_prompt_len=0)):
        with pytest.raises(DataError):
            DataSpec(**bad)
    with pytest.raises(DataError, match="step 2 no data"):
        build_datasets(DataSpec(split_ratios="1,0,1"), _default_tok(), 2)


def _default_tok():
    from transformers import AutoTokenizer

    from fastrlhf.tasks.default_task import default_model_dir
    return AutoTokenizer.from_pretrained(default_model_dir())
