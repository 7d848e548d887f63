"""Bad data fails before training with a DataError naming the file, row, column and the fix."""
import json

import pytest

from fastrlhf.data import DataError, DataSpec, build_datasets


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from fastrlhf.tasks.default_task import default_model_dir
    return AutoTokenizer.from_pretrained(default_model_dir())


def good_rows(n=10):
    return [{"prompt": f"describe the lake {i}", "chosen": "joyful", "rejected": "gloomy"} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def error_for(tok, path, step=2):
    with pytest.raises(DataError) as info:
        build_datasets(DataSpec(paths=[path]), tok, step)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_bad_row_fails_every_step_naming_file_row_and_column(tmp_path, tok, step):
    rows = good_rows()
    rows[6]["chosen"] = "   "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    msg = error_for(tok, path, step)      # every row is validated, not only this step's share
    assert path in msg and "row 6" in msg and "'chosen'" in msg and "empty text" in msg and "Fix:" in msg


def test_missing_value_in_one_row(tmp_path, tok):
    rows = good_rows()
    del rows[3]["rejected"]
    path = write_jsonl(tmp_path / "missing.jsonl", rows)
    msg = error_for(tok, path)
    assert path in msg and "row 3" in msg and "'rejected'" in msg and "missing value" in msg


def test_wrong_type(tmp_path, tok):
    rows = good_rows()
    rows[8]["prompt"] = 42
    path = write_jsonl(tmp_path / "types.jsonl", rows)
    msg = error_for(tok, path)
    assert path in msg and "row 8" in msg and "'prompt'" in msg and "expected a string, got int" in msg


def test_missing_columns_name_what_was_found_and_what_is_accepted(tmp_path, tok):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"text": "hello", "label": 1}])
    msg = error_for(tok, path)
    assert path in msg and "['label', 'text']" in msg and "prompt/chosen/rejected" in msg


def test_ambiguous_response_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "amb.jsonl", [{"prompt": "p", "response": "a", "completion": "b"}])
    msg = error_for(tok, path, 1)
    assert path in msg and "['response', 'completion']" in msg and "exactly one" in msg


def test_bad_chat_messages(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    rows = rows + [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    msg = error_for(tok, path, 1)
    assert path in msg and "row 3" in msg and "'messages[1]'" in msg and "role" in msg
    rows[3] = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]}
    msg = error_for(tok, write_jsonl(tmp_path / "chat2.jsonl", rows), 1)
    assert "row 3" in msg and "'messages[0].content'" in msg and "empty text" in msg


def test_invalid_json_line_names_the_line(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good_rows(1)[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    msg = error_for(tok, str(path))
    assert str(path) in msg and "line 2" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("name, content", [("missing.jsonl", None), ("data.csv", "a,b\n"),
                                           ("corrupt.parquet", "not parquet"), ("latin.jsonl", b"\xff\xfe\x00")])
def test_unreadable_files(tmp_path, tok, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    msg = error_for(tok, str(path))
    assert str(path) in msg and "Fix:" in msg


def test_empty_dataset_and_folder_that_is_not_a_dataset(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no rows" in error_for(tok, str(empty))
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "save_to_disk" in error_for(tok, str(folder))


def test_hub_name_goes_through_load_dataset_and_errors_are_wrapped(tok, monkeypatch):
    import datasets
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match="org/some-set.*load_dataset.*no network"):
        build_datasets(DataSpec(paths=["org/some-set"]), tok, 1)
    assert calls == ["org/some-set"]


def test_hub_dataset_rows_are_used(tok, monkeypatch):
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(good_rows(40))})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: dd)
    train, evals = build_datasets(DataSpec(paths=["org/some-set"], split_ratios="0,1,0"), tok, 2)
    assert len(train) + len(evals) == 40


def test_tokenizer_without_eos_is_refused(tok, tmp_path):
    import copy
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(DataError, match="EOS"):
        build_datasets(DataSpec(paths=[write_jsonl(tmp_path / "d.jsonl", good_rows())]), no_eos, 1)


def test_chat_template_refusal_names_the_row(tmp_path):
    from transformers import AutoTokenizer

    from fastrlhf.tasks.default_task import default_model_dir
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('system turns are not supported') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2
    rows.append({"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}]})
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    with pytest.raises(DataError, match=r"sys.jsonl, row 2: the tokenizer's chat template failed.*system turns"):
        build_datasets(DataSpec(paths=[path], split_ratios="1,0,0", eval_fraction=0.0), tok, 1)
