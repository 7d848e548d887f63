"""The built-in verifiable rewards on tricky strings."""
import pytest

from fastrlhf.rewards import (answers_match, arithmetic_reward, extract_answer, format_reward, length_penalty,
                              make_format_reward, make_length_penalty, math_answer_match, parse_number)


@pytest.mark.parametrize("completion, reference", [
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{\dfrac{3}{4}}.", "0.75"),
    ("The total is 1,000.", "1000"),
    ("#### 1,234,567", "1234567"),
    ("It costs $12.50 in all.", "12.5"),
    ("we get 2/4", "1/2"),
    ("x = -7.", "-7"),
    ("x = \u22127", "-7"),
    ("#### - 3", "-3"),
    ("first 3, then 4, finally 5", "5"),            # several numbers: the last one counts
    ("12 - 7 = 5 . #### 5", "5"),                    # a binary minus is not a sign
    ("answer: +8", "8"),
    (r"\boxed{10} (not 11)", "10"),                  # boxed wins over a later number
    ("#### 42\nand then 7", "42"),                   # #### wins over a later number
    ("3.0", "3"),
    (".5", "1/2"),
    (r"\boxed{\text{yes}}", "Yes"),                  # not a number: normalised text
])
def test_math_answer_match_accepts_equivalent_answers(completion, reference):
    assert math_answer_match(["q"], [completion], answer=[reference]) == [1.0]


@pytest.mark.parametrize("completion, reference", [
    ("1,000", "100"),
    ("1, 2, 3", "1"),        # the last number, not the first
    (r"\boxed{\frac{1}{3}}", "0.33"),
    ("12 - 7 = 5", "-7"),
    ("no number here", "4"),
    ("", "0"),
    ("0.50001", "0.5"),
])
def test_math_answer_match_rejects_different_answers(completion, reference):
    assert math_answer_match(["q"], [completion], answer=[reference]) == [0.0]


def test_extraction_and_parsing_details():
    assert extract_answer("nothing") is None and parse_number("abc") is None
    assert parse_number("1,000,000") == 1_000_000 and parse_number("1,00") is None  # not a thousands group
    assert parse_number(r"\frac{1}{0}") is None and parse_number("1/0") is None
    assert parse_number("7.") == 7 and parse_number("$5") == 5
    assert answers_match("0.5", r"\frac{1}{2}") and not answers_match(None, "1")
    # a reference given as a whole solution: its own final answer is compared
    assert math_answer_match(["q"], ["#### 9"], answer=["3 * 3 = 9 #### 9"]) == [1.0]
    assert math_answer_match(["q"], ["9"], answer=[None]) == [None]   # no ground truth: no reward
    with pytest.raises(KeyError, match="answer"):
        math_answer_match(["q"], ["9"], label=["9"])


def test_format_and_length_rewards():
    good = "<think>7 + 5 is 12</think> <answer>12</answer>"
    assert format_reward(["q"] * 3, [good, "<answer>12</answer>", good + " extra"]) == [1.0, 0.0, 0.0]
    tagged = make_format_reward(r"####\s*\d+", full=False)
    assert tagged(["q", "q"], ["so #### 12", "12"]) == [1.0, 0.0]
    pen = make_length_penalty(max_words=4, scale=2)
    assert pen(["q"] * 4, ["a b c", "a b c d", "a b c d e", "a " * 20]) == [-0.0, -0.0, -0.5, -1.0]
    assert length_penalty(["q"], ["short"]) == [-0.0]


def test_arithmetic_scorer_on_the_bundled_data():
    from fastrlhf.tasks.arithmetic_task import generate_rows
    rows = generate_rows(rows=200)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    fixed = [r["response"].rsplit("####", 1)[0] + "#### " + r["answer"] for r in rows]
    assert arithmetic_reward(prompts, fixed, answer=answers) == [1.0] * 200   # the equations are right
    as_written = arithmetic_reward(prompts, [r["response"] for r in rows], answer=answers)
    assert 0.5 < sum(as_written) / 200 < 0.8      # about SLIP_RATE of the final answers are slips
    wrong = arithmetic_reward(["q"] * 3, ["3 + 4 = 7 . #### 8", "7", "3 + 4 = 7 ."], answer=["7", "8", "7"])
    assert wrong == [0.0, 0.0, 1.0]


def test_the_rows_other_columns_reach_step_3_items_and_batches(tmp_path):
    import json
    from fastrlhf.data import DataSpec, PromptCollator, build_datasets
    from fastrlhf.models.loading import load_tokenizer
    rows = [{"prompt": f"How many is {i} + 1 ?", "response": f"{i} + 1 = {i + 1} . #### {i + 1}", "answer": str(i + 1),
             **({"level": i % 3} if i % 2 else {})} for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from fastrlhf.tasks.arithmetic_task import arithmetic_model_dir
    tok = load_tokenizer(arithmetic_model_dir(), padding_side="left")
    spec = DataSpec(paths=[str(path)], split_ratios="1,0,1", eval_fraction=0.0)
    sft = build_datasets(spec, tok, 1)[0]
    assert "####" in tok.decode(sft[0]["input_ids"])          # `response` is the SFT answer, not `answer`
    train = build_datasets(spec, tok, 3)[0]
    items = [train[i] for i in range(len(train))]
    for it in items:
        i = int(it["prompt"].split("How many is ")[1].split()[0])
        assert it["columns"]["answer"] == str(i + 1) and it["columns"].get("level") == rows[i].get("level")
    batch = PromptCollator(tok.pad_token_id)(items)
    assert batch["columns"]["answer"] == [it["columns"]["answer"] for it in items]
    assert batch["columns"]["level"] == [it["columns"].get("level") for it in items]   # None where missing
